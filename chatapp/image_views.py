"""HTTP transport for images: the upload endpoint and the authenticated image views.

POST /api/attachments/ (multipart: file, conversation?, model?, note?) -> 201 with the attachment's
wire shape, or {"code", "message"} with 400 / 401 / 404 / 413. Uploads need a login and the CSRF
token. An upload may come before its conversation exists (the first message of a new chat): it
stays unbound, visible only to its uploader, until the send binds it.
DELETE /api/attachments/<id>/ removes an unsent upload.
GET /attachments/<id>/thumbnail/ and /attachments/<id>/image/<part>/ serve the stored bytes to
users allowed to see the conversation; there is no public media URL.

Pillow runs in a small dedicated thread pool: off the event loop, and off the single thread
Django and Channels share for sync code (where a slow decode would stall every socket's ORM).
"""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views.csrf import csrf_failure as default_csrf_failure
from django.views.decorators.http import require_GET, require_http_methods

from . import images
from .access import attachment_get_for_user, conversation_get_for_user, model_get_for_user
from .attachments import (
    attachment_create,
    attachment_delete,
    attachment_to_dict,
    attachments_purge_unsent,
    read_image,
)
from .errors import ClientError
from .model_catalog import default_model_for

log = logging.getLogger(__name__)

UPLOAD_PATH = "/api/attachments/"
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


def _too_large() -> JsonResponse:
    limit = settings.IMAGE_MAX_UPLOAD_BYTES / (1024 * 1024)
    return _error(413, "too_large", f"The file is too large; the upload limit is {limit:.1f} MB.")


def _read_upload(request: HttpRequest) -> tuple[str, str, str, bytes, str]:
    """Parse the multipart body (in a worker thread) -> (file name, conversation, model, bytes,
    note: the editor's description of the image's mark-up)."""
    try:
        upload = request.FILES.get("file")
        conversation_id = request.POST.get("conversation") or ""
        model_id = request.POST.get("model") or ""
        note = request.POST.get("note") or ""
    except RequestDataTooBig:
        raise ClientError("too_large", "The upload is too large.") from None
    except (MultiPartParserError, SuspiciousOperation):
        raise ClientError(
            "bad_upload", "The upload could not be read (a malformed form). Try again."
        ) from None
    if upload is None:
        raise ClientError("no_file", "Choose an image to upload (the form field is “file”).")
    if upload.size > settings.IMAGE_MAX_UPLOAD_BYTES:
        raise ClientError("too_large", "")
    data = upload.read()
    return upload.name, conversation_id, model_id, data, note


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
    if declared > settings.IMAGE_MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD:
        return _too_large()
    loop = asyncio.get_running_loop()
    try:
        name, conversation_id, model_id, data, note = await loop.run_in_executor(
            _executor(), _read_upload, request
        )
        conversation, max_edge = await sync_to_async(_resolve_target)(
            user, conversation_id, model_id
        )
        processed = await loop.run_in_executor(_executor(), _process, data, max_edge)
        attachment = await sync_to_async(_store)(
            user=user, conversation=conversation, name=name, processed=processed, note=note
        )
    except ClientError as exc:
        if exc.code == "too_large":
            return _too_large()
        return _error(400, exc.code, exc.message)
    except images.ImageError as exc:
        return _error(400, "bad_image", str(exc))
    except Http404:
        return _error(404, "not_found", "No such conversation.")
    return JsonResponse(attachment, status=201)


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
    attachment = attachment_get_for_user(request.user, pk)
    return _image_response(attachment.thumbnail)


@require_GET
def attachment_image(request: HttpRequest, pk: int, part: int) -> HttpResponse:
    attachment = attachment_get_for_user(request.user, pk)
    found = attachment.parts.select_related("image").filter(index=part).first()
    if found is None:
        raise Http404("No such image part.")
    return _image_response(found.image)


def upload_size_guard(app):
    """ASGI wrapper: refuse an upload whose declared size is over the limit before its body is
    read (Django's ASGI handler spools the whole body before any view runs)."""

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == UPLOAD_PATH:
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            limit = settings.IMAGE_MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD
            if declared.isdigit() and int(declared) > limit:
                body = _too_large().content
                await send(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


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
