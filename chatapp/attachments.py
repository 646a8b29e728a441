"""Image attachments: store processed uploads once, bind them to a sent message, turn them into
the request's image parts, and delete files nothing references any more.

Contract:
* ``attachment_create`` stores an already processed upload (images.process_upload runs in the
  upload view's worker thread, never here): each part and the thumbnail become a StoredImage,
  content-addressed by SHA-256 under MEDIA_ROOT, so the same bytes are stored once. Rows are
  written in one transaction; files written for a failed transaction are removed again.
* An attachment is uploaded before its message exists (and, for a new chat, before its
  conversation exists); ``attachments_bind`` ties it to the user's message inside the send's
  transaction, enforcing vision, ownership and the per-message limits, or raises ClientError
  and the whole send rolls back.
* ``access.attachment_get_for_user`` is the access rule for the image views: a sent image is visible to
  whoever may see its conversation (access.conversation_get_for_user), an unsent one only
  to its uploader.
* ``conversation_delete`` deletes a conversation and every stored image only it referenced.

Synchronous ORM and file code; async callers go through database_sync_to_async.
"""

import io
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Prefetch, Q, prefetch_related_objects
from django.urls import reverse
from django.utils import timezone
from PIL import Image

from .errors import ClientError
from .images import ProcessedUpload, data_url, sha256_hex
from .model_catalog import models_for_user
from .models import (
    Attachment,
    AttachmentPart,
    Conversation,
    Message,
    ProjectPin,
    StoredImage,
)
from .providers.openai_compat import video_part
from .videos import ProcessedVideo, timestamp

log = logging.getLogger(__name__)

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "video/mp4": "mp4"}
FILENAME_MAX = 150
NOTE_MAX = 600


# ---- storage -----------------------------------------------------------------------------------


def media_path(relative: str) -> Path:
    return Path(settings.MEDIA_ROOT) / relative


def _write_once(relative: str, data: bytes) -> bool:
    """Write the file unless it exists; True when this call created it. Atomic (rename)."""
    path = media_path(relative)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _store(data: bytes, *, mime: str, width: int, height: int, written: list[Path]) -> StoredImage:
    digest = sha256_hex(data)
    folder = "videos" if mime.startswith("video/") else "images"
    relative = f"{folder}/{digest[:2]}/{digest}.{_EXTENSIONS[mime]}"
    # Locks an existing row so a concurrent conversation_delete cannot drop it under us.
    image, _ = StoredImage.objects.select_for_update().get_or_create(
        sha256=digest,
        defaults={
            "path": relative,
            "mime": mime,
            "width": width,
            "height": height,
            "bytes": len(data),
        },
    )
    # Also heals a row whose file went missing: the bytes are the same by construction.
    if _write_once(image.path, data):
        written.append(media_path(image.path))
    return image


def _header_size(data: bytes) -> tuple[int, int]:
    # Reads the header only (our own small WebP thumbnail): no decode.
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def clean_filename(name: str | None) -> str:
    """The name shown to people: no directories, no control characters, bounded length."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if len(name) > FILENAME_MAX:
        stem, dot, ext = name.rpartition(".")
        name = (
            stem[: FILENAME_MAX - len(ext) - 2] + "…." + ext
            if dot and len(ext) < 10
            else name[: FILENAME_MAX - 1] + "…"
        )
    return name or "image"


def clean_note(note: str | None) -> str:
    """The editor's description of its mark-up: one line of printable text, bounded."""
    note = " ".join("".join(ch if ch.isprintable() else " " for ch in (note or "")).split())
    return note if len(note) <= NOTE_MAX else note[: NOTE_MAX - 1] + "…"


def attachment_create(
    *,
    owner,
    conversation: Conversation | None,
    filename: str,
    processed: ProcessedUpload,
    note: str = "",
) -> Attachment:
    """Store a processed upload for `owner` (unsent: no message yet). All or nothing."""
    written: list[Path] = []
    try:
        with transaction.atomic():
            thumb_width, thumb_height = _header_size(processed.thumbnail)
            thumbnail = _store(
                processed.thumbnail,
                mime=processed.thumbnail_mime,
                width=thumb_width,
                height=thumb_height,
                written=written,
            )
            attachment = Attachment.objects.create(
                owner=owner,
                conversation=conversation,
                filename=clean_filename(filename),
                source_format=processed.source_format,
                source_width=processed.source_width,
                source_height=processed.source_height,
                thumbnail=thumbnail,
                note=clean_note(note),
            )
            for index, part in enumerate(processed.parts):
                image = _store(
                    part.data,
                    mime=part.mime,
                    width=part.width,
                    height=part.height,
                    written=written,
                )
                AttachmentPart.objects.create(attachment=attachment, index=index, image=image)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    prefetch(attachment)
    return attachment


def attachment_create_video(
    *, owner, conversation: Conversation | None, filename: str, processed: ProcessedVideo
) -> Attachment:
    """Store a processed screen recording: its MP4, its key frames as parts (each captioned
    with its timestamp) and a thumbnail. All or nothing, like attachment_create."""
    written: list[Path] = []
    try:
        with transaction.atomic():
            thumb_width, thumb_height = _header_size(processed.thumbnail)
            thumbnail = _store(
                processed.thumbnail,
                mime="image/webp",
                width=thumb_width,
                height=thumb_height,
                written=written,
            )
            video = _store(
                processed.video,
                mime="video/mp4",
                width=processed.width,
                height=processed.height,
                written=written,
            )
            attachment = Attachment.objects.create(
                owner=owner,
                conversation=conversation,
                filename=clean_filename(filename),
                source_format=processed.source_format,
                source_width=processed.source_width,
                source_height=processed.source_height,
                thumbnail=thumbnail,
                video=video,
                seconds=processed.seconds,
                source_seconds=processed.source_seconds,
            )
            index = 0
            for frame in processed.frames:
                for part in frame.processed.parts:
                    image = _store(
                        part.data,
                        mime=part.mime,
                        width=part.width,
                        height=part.height,
                        written=written,
                    )
                    caption = (
                        f"Frame at {timestamp(frame.seconds)}:"
                        if part is frame.processed.parts[0]
                        else ""
                    )
                    AttachmentPart.objects.create(
                        attachment=attachment, index=index, image=image, caption=caption
                    )
                    index += 1
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    prefetch(attachment)
    return attachment


def prefetch(*attachments: Attachment) -> None:
    prefetch_related_objects(list(attachments), _parts_prefetch())


def _parts_prefetch() -> Prefetch:
    return Prefetch("parts", queryset=AttachmentPart.objects.select_related("image"))


def message_attachments_prefetch() -> Prefetch:
    """For Message querysets: attachments in order, their parts and stored images (2 queries)."""
    return Prefetch(
        "attachments",
        queryset=Attachment.objects.order_by("position", "id")
        .select_related("video")
        .prefetch_related(_parts_prefetch()),
    )


def read_image(image: StoredImage) -> bytes | None:
    try:
        return media_path(image.path).read_bytes()
    except OSError:
        log.warning("stored image %s is missing at %s", image.sha256, image.path)
        return None


# ---- sending -----------------------------------------------------------------------------------


def vision_model_names(user) -> list[str]:
    return [m.display_name for m in models_for_user(user) if m.vision]


def attachments_bind(
    *, user, conversation: Conversation, message: Message, attachment_ids: list[int]
) -> list[Attachment]:
    """Tie the user's unsent uploads to `message`, in the order given. Run inside the send's
    transaction: a ClientError here rolls the whole message back."""
    if not attachment_ids:
        return []
    if len(set(attachment_ids)) != len(attachment_ids):
        raise ClientError("bad_attachments", "The same image is attached twice.")
    model = conversation.model
    if model is not None and not model.vision:
        names = vision_model_names(user)
        hint = f" Models that can: {', '.join(names)}." if names else ""
        raise ClientError(
            "no_vision",
            f"{model.display_name} cannot see images. Remove the images or pick another "
            f"model.{hint}",
        )
    rows = {
        a.pk: a
        # of=self: the video join is an outer join, which PostgreSQL cannot lock.
        for a in Attachment.objects.select_for_update(of=("self",))
        .select_related("video")
        .filter(pk__in=attachment_ids, owner=user, message__isnull=True)
        .filter(Q(conversation__isnull=True) | Q(conversation=conversation))
        .filter(project_pin__isnull=True)  # a project's pinned reference is sent as its prefix
    }
    if len(rows) != len(attachment_ids):
        raise ClientError(
            "attachment_unavailable",
            "An attached image is no longer available (already sent or removed). "
            "Remove it and attach it again.",
        )
    attachments = [rows[pk] for pk in attachment_ids]
    prefetch(*attachments)
    video = bool(model and model.video)
    count = sum(_sent_count(a, video=video) for a in attachments)
    if count > settings.IMAGE_MAX_PER_MESSAGE:
        raise ClientError(
            "too_many_images",
            f"A message can carry at most {settings.IMAGE_MAX_PER_MESSAGE} images (a very tall "
            f"screenshot counts once per tile, a recording sent as frames once per frame); "
            f"this one has {count}.",
        )
    total = sum(_sent_bytes(a, video=video) for a in attachments)
    if total > settings.IMAGE_MAX_BYTES_PER_MESSAGE:
        raise ClientError(
            "images_too_large",
            f"The images and recordings in one message may total at most "
            f"{format_bytes(settings.IMAGE_MAX_BYTES_PER_MESSAGE)}; these are "
            f"{format_bytes(total)}. Send them in more than one message.",
        )
    if model is not None:
        for attachment in attachments:
            edges = [max(p.image.width, p.image.height) for p in attachment.parts.all()]
            if max(edges) > model.max_image_edge:
                raise ClientError(
                    "image_too_large_for_model",
                    f"{attachment.filename} was prepared for a model that takes larger images "
                    f"than {model.display_name} ({model.max_image_edge} px). Remove it and "
                    "attach it again.",
                )
    for position, attachment in enumerate(attachments):
        attachment.message = message
        attachment.conversation = conversation
        attachment.position = position
    Attachment.objects.bulk_update(attachments, ["message", "conversation", "position"])
    return attachments


def _as_video(attachment: Attachment, *, video: bool) -> bool:
    """A recording goes as one video part to a model that takes video, else as its frames."""
    return video and attachment.video_id is not None


def _sent_count(attachment: Attachment, *, video: bool) -> int:
    return 1 if _as_video(attachment, video=video) else len(attachment.parts.all())


def _sent_bytes(attachment: Attachment, *, video: bool) -> int:
    if _as_video(attachment, video=video):
        return attachment.video.bytes
    return sum(part.image.bytes for part in attachment.parts.all())


def _recording_text(attachment: Attachment, *, as_video: bool) -> str:
    seconds = f"{attachment.seconds:.1f} s"
    if attachment.source_seconds and attachment.source_seconds > (attachment.seconds or 0) + 0.05:
        seconds += f" (the first {attachment.seconds:.1f} s of {attachment.source_seconds:.1f} s)"
    if as_video:
        return (
            f"The video above is the screen recording {attachment.filename}, {seconds}, no audio."
        )
    frames = len(attachment.parts.all())
    return (
        f"The {frames} image{'s' if frames != 1 else ''} above "
        f"{'are key frames' if frames != 1 else 'is a key frame'} (taken at scene changes, with "
        f"their timestamps) of the screen recording {attachment.filename}, {seconds}."
    )


def user_content(message: Message, *, vision: bool, video: bool = False) -> str | list[dict]:
    """A user message for the request: plain text, or text then image parts in order.

    Needs message_attachments_prefetch(). The data URLs come from the stored processed bytes,
    so every later turn re-sends byte-identical parts (the provider's prefix cache hits).
    """
    attachments = list(message.attachments.all())
    if not attachments:
        return message.content
    if not vision:
        count = sum(len(a.parts.all()) for a in attachments)
        note = f"[{count} image{'s' if count != 1 else ''} not shown: this model cannot see images]"
        return f"{message.content}\n\n{note}" if message.content else note
    parts: list[dict] = []
    if message.content:
        parts.append({"type": "text", "text": message.content})
    for attachment in attachments:
        if _as_video(attachment, video=video):
            data = read_image(attachment.video)
            if data is None:
                parts.append({"type": "text", "text": "[recording no longer available]"})
                continue
            parts.append(video_part(attachment.video.mime, data))
            parts.append({"type": "text", "text": _recording_text(attachment, as_video=True)})
            continue
        for part in attachment.parts.all():
            if part.caption:
                parts.append({"type": "text", "text": part.caption})
            data = read_image(part.image)
            if data is None:
                parts.append({"type": "text", "text": "[image no longer available]"})
            else:
                url = data_url(data, part.image.mime)
                parts.append({"type": "image_url", "image_url": {"url": url}})
        if attachment.video_id is not None:
            parts.append({"type": "text", "text": _recording_text(attachment, as_video=False)})
        if attachment.note:
            parts.append({"type": "text", "text": attachment.note})
    return parts


# ---- wire shape --------------------------------------------------------------------------------


def format_bytes(n: int) -> str:
    if n < 1024 * 1024:
        return f"{max(1, round(n / 1024))} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def attachment_label(attachment: Attachment) -> str:
    """What will be sent, e.g. "1920×1080 → 1568×882, 412 KB"."""
    parts = [p.image for p in attachment.parts.all()]
    source = f"{attachment.source_width}×{attachment.source_height}"
    # A PDF page says which page of which file it is ("page 3 of diagram.pdf: 1700×2200 → …").
    prefix = f"{attachment.filename}: " if attachment.source_format == "PDF" else ""
    size = format_bytes(sum(p.bytes for p in parts))
    if len(parts) == 1:
        return f"{prefix}{source} → {parts[0].width}×{parts[0].height}, {size}"
    width = max(p.width for p in parts)
    height = max(p.height for p in parts)
    return f"{prefix}{source} → {len(parts)} tiles of up to {width}×{height}, {size}"


def recording_label(attachment: Attachment) -> dict:
    """Both ways a recording can be sent, for the composer to show the one the model gets."""
    parts = [p.image for p in attachment.parts.all()]
    seconds = f"{attachment.seconds:.1f} s"
    if attachment.source_seconds and attachment.source_seconds > (attachment.seconds or 0) + 0.05:
        seconds += f" of {attachment.source_seconds:.1f} s"
    video = attachment.video
    return {
        "seconds": attachment.seconds,
        "source_seconds": attachment.source_seconds,
        "as_video": f"{seconds} → video {video.width}×{video.height}, {format_bytes(video.bytes)}",
        "as_frames": (
            f"{seconds} → {len(parts)} key frame{'s' if len(parts) != 1 else ''} with "
            f"timestamps, {format_bytes(sum(p.bytes for p in parts))}"
        ),
        "video_bytes": video.bytes,
        "frames": len(parts),
    }


def attachment_to_dict(attachment: Attachment) -> dict:
    parts = list(attachment.parts.all())
    if attachment.video_id is not None:
        recording = recording_label(attachment)
        return {
            "id": attachment.pk,
            "kind": "recording",
            "name": attachment.filename,
            "label": recording["as_frames"],
            "recording": recording,
            "thumbnail_url": reverse("attachment-thumbnail", args=[attachment.pk]),
            "url": reverse("attachment-image", args=[attachment.pk, 0]),
            "part_urls": [
                reverse("attachment-image", args=[attachment.pk, p.index]) for p in parts
            ],
            "source_width": attachment.source_width,
            "source_height": attachment.source_height,
            "bytes": recording["video_bytes"],
            "note": attachment.note,
        }
    return {
        "id": attachment.pk,
        "kind": "image",
        "name": attachment.filename,
        "label": attachment_label(attachment),
        "thumbnail_url": reverse("attachment-thumbnail", args=[attachment.pk]),
        "url": reverse("attachment-image", args=[attachment.pk, 0]),
        "part_urls": [reverse("attachment-image", args=[attachment.pk, p.index]) for p in parts],
        "source_width": attachment.source_width,
        "source_height": attachment.source_height,
        "bytes": sum(p.image.bytes for p in parts),
        "note": attachment.note,
    }


def message_attachment_dicts(message: Message) -> list[dict]:
    """Attachments of a message whose attachments were prefetched; [] otherwise (never queries,
    so it is safe on the event loop)."""
    cache = getattr(message, "_prefetched_objects_cache", {})
    if "attachments" not in cache:
        return []
    return [attachment_to_dict(a) for a in cache["attachments"]]


# ---- deleting ----------------------------------------------------------------------------------


def _delete_unreferenced(image_ids: set[int]) -> int:
    """Delete the stored images among `image_ids` that nothing references; files go after
    commit (a rolled-back delete keeps them)."""
    if not image_ids:
        return 0
    locked = list(StoredImage.objects.select_for_update().filter(pk__in=image_ids))
    used = (
        set(
            AttachmentPart.objects.filter(image_id__in=image_ids).values_list("image_id", flat=True)
        )
        | set(
            Attachment.objects.filter(thumbnail_id__in=image_ids).values_list(
                "thumbnail_id", flat=True
            )
        )
        | set(Attachment.objects.filter(video_id__in=image_ids).values_list("video_id", flat=True))
    )
    doomed = [image for image in locked if image.pk not in used]
    if not doomed:
        return 0
    StoredImage.objects.filter(pk__in=[image.pk for image in doomed]).delete()
    paths = [media_path(image.path) for image in doomed]

    def unlink() -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    transaction.on_commit(unlink)
    return len(doomed)


def _image_ids_of(attachments) -> set[int]:
    ids = set(attachments.values_list("thumbnail_id", flat=True))
    ids |= {pk for pk in attachments.values_list("video_id", flat=True) if pk is not None}
    ids |= set(
        AttachmentPart.objects.filter(attachment__in=attachments).values_list("image_id", flat=True)
    )
    return ids


@transaction.atomic
def conversation_delete(*, conversation: Conversation) -> None:
    """Delete a conversation with its messages and attachments, and every stored image file
    that no other message (or unsent upload) still references."""
    image_ids = _image_ids_of(Attachment.objects.filter(conversation=conversation))
    conversation.delete()
    _delete_unreferenced(image_ids)


def messages_delete(*, messages) -> None:
    """Delete these messages (a queryset) with their attachments, and every stored image file
    nothing else references (an edit drops the later turns). Call inside a transaction."""
    image_ids = _image_ids_of(Attachment.objects.filter(message__in=messages))
    messages.delete()
    _delete_unreferenced(image_ids)


@transaction.atomic
def attachment_delete(*, attachment: Attachment) -> None:
    """Remove an unsent upload (the composer's remove button)."""
    if attachment.message_id is not None:
        raise ClientError("already_sent", "This image was sent and stays with its message.")
    if ProjectPin.objects.filter(attachment=attachment).exists():
        raise ClientError("pinned", "This image is pinned to a project: unpin it there.")
    image_ids = _image_ids_of(Attachment.objects.filter(pk=attachment.pk))
    attachment.delete()
    _delete_unreferenced(image_ids)


@transaction.atomic
def attachments_purge_unsent(*, older_than: timedelta | None = None) -> int:
    """Delete uploads never sent within the TTL (abandoned composers), and stored images left
    without any reference by deletes that bypassed conversation_delete (the admin, a deleted
    user's conversations). Cheap enough to run on every upload."""
    if older_than is None:
        older_than = timedelta(hours=settings.IMAGE_UNSENT_TTL_HOURS)
    stale = Attachment.objects.filter(
        message__isnull=True,
        batch_item__isnull=True,  # a batch's images live as long as the batch
        project_pin__isnull=True,  # a project's pinned references live as long as their pin
        created_at__lt=timezone.now() - older_than,
    )
    _, deleted = stale.delete()
    orphans = (
        StoredImage.objects.filter(parts__isnull=True)
        .exclude(pk__in=Attachment.objects.values("thumbnail_id"))
        .exclude(pk__in=Attachment.objects.filter(video__isnull=False).values("video_id"))
    )
    _delete_unreferenced(set(orphans.values_list("pk", flat=True)))
    return deleted.get(Attachment._meta.label, 0)


# ---- project pins (chatapp/projects.py) ------------------------------------------------------


def attachments_delete(*, attachments) -> None:
    """Delete these attachments (a queryset) and the stored images nothing else references
    (an unpinned reference, a deleted project's pins). Call inside a transaction."""
    image_ids = _image_ids_of(attachments)
    attachments.delete()
    _delete_unreferenced(image_ids)
