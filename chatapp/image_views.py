"""HTTP transport for images: the upload endpoint and the authenticated image views.

POST /api/attachments/ (multipart: file, conversation?, model?, note?) -> 201 with the attachment's
wire shape, or {"code", "message"} with 400 / 401 / 404 / 413. Uploads need a login and the CSRF
token. A PDF (recognised from its bytes) needs `pages` ("1,3"): each page is rendered and stored
as its own image attachment, and the answer is {"attachments": [...]}, in page order as given.
POST /api/attachments/pdf-preview/ (multipart: file, model?) -> 200 {"page_count", "pages": [{
"number", "send_size", "thumbnail"?}], "default_pages", "max_pages"}: the page picker's data;
nothing is stored.
A screen recording (MP4, MOV, WebM, recognised from its bytes) is normalised into an MP4 and
its key frames, stored as one attachment; the answer's "recording" says both ways it may be
sent (as video to a model that takes video, as timestamped frames to the others). An upload may come before its conversation exists (the first message of a new chat): it
stays unbound, visible only to its uploader, until the send binds it.
DELETE /api/attachments/<id>/ removes an unsent upload.
GET /attachments/<id>/thumbnail/ and /attachments/<id>/image/<part>/ serve the stored bytes to
users allowed to see the conversation, or to read it through a live share
(access.attachment_get_for_reader); there is no public media URL.

Pillow runs in a small dedicated thread pool: off the event loop, and off the single thread
Django and Channels share for sync code (where a slow decode would stall every socket's ORM).
"""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views.csrf import csrf_failure as default_csrf_failure
from django.views.decorators.http import require_GET, require_http_methods

from . import images, pdfs, videos
from .access import (
    attachment_get_for_reader,
    attachment_get_for_user,
    conversation_get_for_user,
    model_get_for_user,
)
from .attachments import (
    attachment_create,
    attachment_create_video,
    attachment_delete,
    attachment_to_dict,
    attachments_purge_unsent,
    clean_filename,
    format_bytes,
    read_image,
)
from .errors import ClientError
from .model_catalog import default_model_for

log = logging.getLogger(__name__)

UPLOAD_PATH = "/api/attachments/"
PDF_PREVIEW_PATH = "/api/attachments/pdf-preview/"
# Multipart framing around the file: boundary lines and part headers.
MULTIPART_OVERHEAD = 64 * 1024

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=settings.IMAGE_WORKERS, thread_name_prefix="image")
    return _pool


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"code": code, "message": message}, status=status)


def max_upload_bytes() -> int:
    """The largest file any kind of upload accepts (each kind then checks its own limit)."""
    return max(
        settings.IMAGE_MAX_UPLOAD_BYTES,
        settings.PDF_MAX_UPLOAD_BYTES,
        settings.VIDEO_MAX_UPLOAD_BYTES,
    )


def _too_large(limit: int | None = None) -> JsonResponse:
    size = format_bytes(limit or max_upload_bytes())
    return _error(413, "too_large", f"The file is too large; the upload limit is {size}.")


def _read_upload(request: HttpRequest) -> tuple[str, str, str, bytes, dict]:
    """Parse the multipart body (in a worker thread) -> (file name, conversation, model, bytes,
    the other fields: note (the editor's description of its mark-up), pages (of a PDF))."""
    try:
        upload = request.FILES.get("file")
        conversation_id = request.POST.get("conversation") or ""
        model_id = request.POST.get("model") or ""
        fields = {key: request.POST.get(key) or "" for key in ("note", "pages")}
    except RequestDataTooBig:
        raise ClientError("too_large", "The upload is too large.") from None
    except (MultiPartParserError, SuspiciousOperation):
        raise ClientError(
            "bad_upload", "The upload could not be read (a malformed form). Try again."
        ) from None
    if upload is None:
        raise ClientError("no_file", "Choose an image to upload (the form field is “file”).")
    if upload.size > max_upload_bytes():
        raise ClientError("too_large", "")
    data = upload.read()
    return upload.name, conversation_id, model_id, data, fields


def _process(data: bytes, max_edge: int) -> images.ProcessedUpload:
    try:
        return images.process_upload(
            data,
            max_upload_bytes=settings.IMAGE_MAX_UPLOAD_BYTES,
            max_pixels=settings.IMAGE_MAX_PIXELS,
            max_edge=max_edge,
            max_output_bytes=settings.IMAGE_MAX_OUTPUT_BYTES,
            max_tiles=settings.IMAGE_MAX_TILES,
        )
    except images.ImageError:
        raise
    except Exception as exc:
        # A decoder failure the pipeline did not foresee is still the file's fault, not a 500.
        log.exception("image pipeline failed")
        raise images.ImageError(
            f"This file could not be read as an image. Upload {images.ACCEPTED_TYPES_TEXT}."
        ) from exc


def _pdf_options(max_edge: int) -> dict:
    return {
        "max_pages": settings.PDF_MAX_PAGES,
        "dpi": settings.PDF_RENDER_DPI,
        "max_edge": max_edge,
        "max_tiles": settings.IMAGE_MAX_TILES,
        "max_page_pixels": settings.PDF_MAX_PAGE_PIXELS,
    }


def _parse_pages(raw: str) -> list[int]:
    try:
        pages = [int(part) for part in raw.replace(" ", "").split(",") if part]
    except ValueError:
        pages = []
    if not pages:
        raise ClientError("no_pages", "Pick at least one page of the PDF to send.")
    if len(set(pages)) != len(pages):
        raise ClientError("bad_pages", "A page is picked twice.")
    if len(pages) > settings.PDF_MAX_PICKED_PAGES:
        raise ClientError(
            "too_many_pages",
            f"Pick at most {settings.PDF_MAX_PICKED_PAGES} pages of one PDF "
            f"({len(pages)} are picked).",
        )
    return pages


async def _in_pool(timeout: float, error: images.ImageError, function, *args, **kwargs):
    """Run in the image worker pool; work that takes too long ends with `error` for the user
    (the worker finishes it in the background: PDFium and FFmpeg cannot be interrupted)."""
    loop = asyncio.get_running_loop()
    call = loop.run_in_executor(_executor(), lambda: function(*args, **kwargs))
    try:
        return await asyncio.wait_for(call, timeout)
    except TimeoutError:
        raise error from None


def _pdf_timeout() -> pdfs.PdfError:
    return pdfs.PdfError(
        f"The PDF took longer than {settings.PDF_RENDER_TIMEOUT:g} seconds to render. Attach "
        "fewer pages, or screenshots of the pages you need."
    )


def _resolve_target(user, conversation_id: str, model_id: str):
    """-> (conversation or None, the longest edge to prepare for). Raises Http404 / ClientError."""
    conversation = conversation_get_for_user(user, conversation_id) if conversation_id else None
    if model_id:
        model = model_get_for_user(user, model_id)
    elif conversation is not None and conversation.model is not None:
        model = conversation.model
    else:
        model = default_model_for(user)
    max_edge = model.max_image_edge if model is not None else images.DEFAULT_MAX_EDGE
    return conversation, max_edge


async def upload(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return _error(405, "method", "Upload with POST.")
    user = await request.auser()
    if not user.is_authenticated:
        return _error(401, "login", "Log in to upload images.")
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > max_upload_bytes() + MULTIPART_OVERHEAD:
        return _too_large()
    loop = asyncio.get_running_loop()
    try:
        name, conversation_id, model_id, data, fields = await loop.run_in_executor(
            _executor(), _read_upload, request
        )
        conversation, max_edge = await sync_to_async(_resolve_target)(
            user, conversation_id, model_id
        )
        if pdfs.is_pdf(data):
            return await _upload_pdf(user, conversation, name, data, fields["pages"], max_edge)
        if videos.is_video(data):
            return await _upload_video(user, conversation, name, data, max_edge)
        if len(data) > settings.IMAGE_MAX_UPLOAD_BYTES:
            return _too_large(settings.IMAGE_MAX_UPLOAD_BYTES)
        processed = await loop.run_in_executor(_executor(), _process, data, max_edge)
        attachment = await sync_to_async(_store)(
            user=user,
            conversation=conversation,
            name=name,
            processed=processed,
            note=fields["note"],
        )
    except ClientError as exc:
        if exc.code == "too_large":
            return _too_large()
        return _error(400, exc.code, exc.message)
    except pdfs.PdfError as exc:
        return _error(400, "bad_pdf", str(exc))
    except videos.VideoError as exc:
        return _error(400, "bad_video", str(exc))
    except images.ImageError as exc:
        return _error(400, "bad_image", str(exc))
    except Http404:
        return _error(404, "not_found", "No such conversation.")
    return JsonResponse(attachment, status=201)


async def _upload_pdf(user, conversation, name, data, raw_pages, max_edge) -> JsonResponse:
    """Render the picked pages; each becomes an image attachment named after its page."""
    if len(data) > settings.PDF_MAX_UPLOAD_BYTES:
        return _too_large(settings.PDF_MAX_UPLOAD_BYTES)
    pages = _parse_pages(raw_pages)
    name = clean_filename(name)
    rendered = await _in_pool(
        settings.PDF_RENDER_TIMEOUT,
        _pdf_timeout(),
        pdfs.pdf_render_pages,
        data,
        pages,
        name=name,
        max_output_bytes=settings.IMAGE_MAX_OUTPUT_BYTES,
        **_pdf_options(max_edge),
    )
    stored = await sync_to_async(_store_pages)(
        user=user, conversation=conversation, name=name, rendered=rendered
    )
    return JsonResponse({"attachments": stored}, status=201)


async def _upload_video(user, conversation, name, data, max_edge) -> JsonResponse:
    """Normalise a screen recording (video + key frames) in the worker pool and store it."""
    if len(data) > settings.VIDEO_MAX_UPLOAD_BYTES:
        return _too_large(settings.VIDEO_MAX_UPLOAD_BYTES)
    timeout = settings.VIDEO_PROCESS_TIMEOUT
    processed = await _in_pool(
        timeout,
        videos.VideoError(
            f"The recording took longer than {timeout:g} seconds to prepare. Attach a shorter "
            "or smaller one."
        ),
        videos.process_video,
        data,
        max_upload_bytes=settings.VIDEO_MAX_UPLOAD_BYTES,
        max_seconds=settings.VIDEO_MAX_SECONDS,
        fps=settings.VIDEO_FPS,
        max_edge=settings.VIDEO_MAX_EDGE,
        max_output_bytes=settings.VIDEO_MAX_OUTPUT_BYTES,
        max_frames=settings.VIDEO_MAX_FRAMES,
        image_max_edge=max_edge,
        image_max_output_bytes=settings.IMAGE_MAX_OUTPUT_BYTES,
        image_max_tiles=settings.IMAGE_MAX_TILES,
    )
    stored = await sync_to_async(_store_video)(
        user=user, conversation=conversation, name=name, processed=processed
    )
    return JsonResponse(stored, status=201)


def _store_video(*, user, conversation, name: str, processed: videos.ProcessedVideo) -> dict:
    attachments_purge_unsent()
    attachment = attachment_create_video(
        owner=user, conversation=conversation, filename=name, processed=processed
    )
    return attachment_to_dict(attachment)


@transaction.atomic
def _store_pages(*, user, conversation, name: str, rendered: list[pdfs.RenderedPage]) -> list:
    attachments_purge_unsent()
    return [
        attachment_to_dict(
            attachment_create(
                owner=user,
                conversation=conversation,
                filename=f"page {page.number} of {name}",
                processed=page.processed,
                note=f"The image above is page {page.number} of {name}.",
            )
        )
        for page in rendered
    ]


async def pdf_preview(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return _error(405, "method", "Upload with POST.")
    user = await request.auser()
    if not user.is_authenticated:
        return _error(401, "login", "Log in to upload files.")
    loop = asyncio.get_running_loop()
    try:
        name, conversation_id, model_id, data, _ = await loop.run_in_executor(
            _executor(), _read_upload, request
        )
        if not pdfs.is_pdf(data):
            raise pdfs.PdfError("This file is not a PDF.")
        if len(data) > settings.PDF_MAX_UPLOAD_BYTES:
            return _too_large(settings.PDF_MAX_UPLOAD_BYTES)
        _, max_edge = await sync_to_async(_resolve_target)(user, conversation_id, model_id)
        preview = await _in_pool(
            settings.PDF_RENDER_TIMEOUT,
            _pdf_timeout(),
            pdfs.pdf_preview,
            data,
            name=clean_filename(name),
            **_pdf_options(max_edge),
        )
    except ClientError as exc:
        if exc.code == "too_large":
            return _too_large()
        return _error(400, exc.code, exc.message)
    except images.ImageError as exc:
        return _error(400, "bad_pdf", str(exc))
    except Http404:
        return _error(404, "not_found", "No such conversation.")
    pages = [
        {
            "number": page.number,
            "send_size": page.send_size,
            "thumbnail": images.data_url(page.thumbnail, "image/webp") if page.thumbnail else None,
        }
        for page in preview.pages
    ]
    return JsonResponse(
        {
            "page_count": preview.page_count,
            "pages": pages,
            "default_pages": list(
                range(1, min(settings.PDF_DEFAULT_PAGES, preview.page_count) + 1)
            ),
            "max_pages": settings.PDF_MAX_PICKED_PAGES,
        }
    )


def _store(
    *, user, conversation, name: str, processed: images.ProcessedUpload, note: str = ""
) -> dict:
    attachments_purge_unsent()
    attachment = attachment_create(
        owner=user, conversation=conversation, filename=name, processed=processed, note=note
    )
    return attachment_to_dict(attachment)


@require_http_methods(["DELETE"])
def attachment_remove(request: HttpRequest, pk: int) -> JsonResponse:
    if not request.user.is_authenticated:
        return _error(401, "login", "Log in first.")
    try:
        attachment = attachment_get_for_user(request.user, pk)
        if attachment.owner_id != request.user.pk:
            raise Http404
        attachment_delete(attachment=attachment)
    except Http404:
        return _error(404, "not_found", "No such image.")
    except ClientError as exc:
        return _error(400, exc.code, exc.message)
    return JsonResponse({"deleted": pk})


def _image_response(image) -> HttpResponse:
    data = read_image(image)
    if data is None:
        raise Http404("This image is no longer stored.")
    response = HttpResponse(data, content_type=image.mime)
    # Private: browsers may keep it, shared caches must not. The bytes behind an id never change.
    response["Cache-Control"] = "private, max-age=86400"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["Content-Disposition"] = "inline"
    return response


@require_GET
def attachment_thumbnail(request: HttpRequest, pk: int) -> HttpResponse:
    attachment = attachment_get_for_reader(request.user, pk)
    return _image_response(attachment.thumbnail)


@require_GET
def attachment_image(request: HttpRequest, pk: int, part: int) -> HttpResponse:
    attachment = attachment_get_for_reader(request.user, pk)
    found = attachment.parts.select_related("image").filter(index=part).first()
    if found is None:
        raise Http404("No such image part.")
    return _image_response(found.image)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """JSON for the page's API calls (the composer shows the message); Django's page otherwise."""
    if request.path.startswith("/api/"):
        return _error(
            403,
            "csrf",
            "The upload was refused: the page's security token is missing or stale. "
            "Reload the page and try again.",
        )
    return default_csrf_failure(request, reason=reason)
