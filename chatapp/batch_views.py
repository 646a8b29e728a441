"""HTTP transport for batches: the page, the uploads, the estimate, create and controls, exports.

GET  /batches/ and /batches/<id>/       the Batch page (new batch form, or one batch's table)
POST /api/batches/files                  multipart `file`: an image, a PDF (one image per page) or
                                         a zip of them -> 201 {"images": [...], "errors": [...]}
                                         (a bad file or page is reported in `errors`; the rest of
                                         the upload is kept)
POST /api/batches/estimate               JSON {model, question, fields, images} -> the estimate
POST /api/batches/                       the same JSON (+ name) -> 201 {"id", "url"}, or 400
                                         with {"code", "message"} (e.g. budget_exceeded)
POST /api/batches/<id>/<action>          pause | resume | cancel | retry -> the batch
POST /api/batches/<id>/delete            the batch, its items and its images
POST /api/batches/<id>/items/<item>/open a conversation with that item -> {"url"}
GET  /batches/<id>/export.csv, export-excel.csv, export.jsonl
Every batch goes through access.batch_get_for_user (only its owner).
"""

import asyncio
import io
import json
import logging
import zipfile

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from . import batches, events, images, pdfs, tasks
from .access import batch_get_for_user, batch_item_get_for_user, model_get_for_user
from .attachments import attachment_create, attachment_to_dict, clean_filename, format_bytes
from .audit import client_ip
from .errors import ClientError
from .image_views import _executor, _in_pool, _pdf_options, _pdf_timeout, _process
from .model_catalog import default_model_for, models_for_user
from .teams import current_team_for

log = logging.getLogger(__name__)

ZIP_SKIP = ("__MACOSX/", ".")


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"code": code, "message": message}, status=status)


# ---- the page ---------------------------------------------------------------------------------


@login_required
@require_GET
def batch_page(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    batch = batch_get_for_user(request.user, pk) if pk is not None else None
    models = [m for m in models_for_user(request.user) if m.vision]
    default = default_model_for(request.user)
    return render(
        request,
        "chatapp/batch.html",
        {
            "batch": batch,
            "batches": batches.batches_for_user(request.user),
            "models": models,
            "current_model": default if default in models else (models[0] if models else None),
            "max_items": settings.BATCH_MAX_ITEMS,
            "field_types": batches.FIELD_TYPES,
        },
    )


# ---- uploads ----------------------------------------------------------------------------------


def _read_upload(request: HttpRequest) -> tuple[str, str, bytes]:
    upload = request.FILES.get("file")
    if upload is None:
        raise ClientError("no_file", "Choose images, PDFs or a zip of them.")
    if upload.size > settings.BATCH_MAX_UPLOAD_BYTES:
        raise ClientError("too_large", "That file is larger than the batch upload limit.")
    return upload.name, request.POST.get("model") or "", upload.read()


def _member_limit() -> int:
    return max(settings.IMAGE_MAX_UPLOAD_BYTES, settings.PDF_MAX_UPLOAD_BYTES)


def _zip_members(data: bytes) -> list[tuple[str, bytes]]:
    """The files of a zip (folders, hidden files and macOS metadata skipped), each bounded by
    the image (or PDF) upload limit before it is read (a zip bomb stops here)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ClientError("bad_zip", "That zip file could not be read.") from None
    members = []
    for info in archive.infolist():
        name = info.filename
        base = name.rsplit("/", 1)[-1]
        if info.is_dir() or name.startswith(ZIP_SKIP[0]) or base.startswith(ZIP_SKIP[1]):
            continue
        if len(members) >= settings.BATCH_MAX_ITEMS:
            raise ClientError(
                "too_many", f"A batch takes at most {settings.BATCH_MAX_ITEMS} images."
            )
        if info.file_size > _member_limit():
            members.append((base, b""))  # refused below with the size message
            continue
        with archive.open(info) as handle:
            members.append((base, handle.read(_member_limit() + 1)))
    return members


async def _pdf_pages(
    *, user, name: str, data: bytes, max_edge: int, room: int
) -> tuple[list, list]:
    """A PDF expanded to one stored image per page, rendered one page at a time (a long PDF
    never holds all its pages in memory). -> (images, errors): a page that cannot be rendered
    is reported and the other pages are kept; a PDF that cannot be opened (encrypted, corrupt,
    over the page cap) is one error."""
    if len(data) > settings.PDF_MAX_UPLOAD_BYTES:
        limit = format_bytes(settings.PDF_MAX_UPLOAD_BYTES)
        return [], [{"name": name, "message": f"{name} is larger than the {limit} PDF limit."}]
    options = _pdf_options(max_edge)
    try:
        count = await _in_pool(
            settings.PDF_RENDER_TIMEOUT,
            _pdf_timeout(),
            pdfs.pdf_page_count,
            data,
            name=name,
            max_pages=options["max_pages"],
        )
    except pdfs.PdfError as exc:
        return [], [{"name": name, "message": str(exc)}]
    stored, errors = [], []
    if count > room:
        errors.append(
            {
                "name": name,
                "message": f"Pages {room + 1}–{count} of {name} left out: a batch takes at most "
                f"{settings.BATCH_MAX_ITEMS} images.",
            }
        )
    for number in range(1, min(count, room) + 1):
        page_name = f"page {number} of {name}"
        try:
            (page,) = await _in_pool(
                settings.PDF_RENDER_TIMEOUT,
                _pdf_timeout(),
                pdfs.pdf_render_pages,
                data,
                [number],
                name=name,
                max_output_bytes=settings.IMAGE_MAX_OUTPUT_BYTES,
                **options,
            )
            stored.append(
                await sync_to_async(_store)(user=user, name=page_name, processed=page.processed)
            )
        except images.ImageError as exc:  # PdfError included
            errors.append({"name": page_name, "message": str(exc)})
    return stored, errors


def _store(*, user, name: str, processed) -> dict:
    attachment = attachment_create(
        owner=user, conversation=None, filename=name, processed=processed
    )
    entry = attachment_to_dict(attachment)
    entry["size"] = batches.attachment_size_label(attachment)
    entry["tokens"] = sum(
        batches.image_tokens(p.image.width, p.image.height) for p in attachment.parts.all()
    )
    return entry


def _max_edge(user, model_id: str) -> int:
    model = model_get_for_user(user, model_id) if model_id else default_model_for(user)
    return model.max_image_edge if model is not None else images.DEFAULT_MAX_EDGE


async def batch_files(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return _error(405, "method", "Upload with POST.")
    user = await request.auser()
    if not user.is_authenticated:
        return _error(401, "login", "Log in to upload images.")
    loop = asyncio.get_running_loop()
    try:
        name, model_id, data = await loop.run_in_executor(_executor(), _read_upload, request)
        max_edge = await sync_to_async(_max_edge)(user, model_id)
        if data[:4] == b"PK\x03\x04":
            members = await loop.run_in_executor(_executor(), _zip_members, data)
        else:
            members = [(name, data)]
    except ClientError as exc:
        return _error(413 if exc.code == "too_large" else 400, exc.code, exc.message)
    stored, errors = [], []
    limit = settings.BATCH_MAX_ITEMS
    for member_name, member_data in members:
        member_name = clean_filename(member_name)
        if len(stored) >= limit:  # PDFs in a zip can add up to more than one batch takes
            errors.append(
                {"name": member_name, "message": f"Left out: a batch takes at most {limit} images."}
            )
            continue
        if pdfs.is_pdf(member_data):
            pages, problems = await _pdf_pages(
                user=user,
                name=member_name,
                data=member_data,
                max_edge=max_edge,
                room=limit - len(stored),
            )
            stored += pages
            errors += problems
            continue
        try:
            processed = await loop.run_in_executor(_executor(), _process, member_data, max_edge)
            stored.append(
                await sync_to_async(_store)(user=user, name=member_name, processed=processed)
            )
        except images.ImageError as exc:
            errors.append({"name": member_name, "message": str(exc)})
    return JsonResponse({"images": stored, "errors": errors}, status=201)


# ---- estimate, create, controls -------------------------------------------------------------


def _payload(request: HttpRequest) -> dict:
    try:
        data = json.loads(request.body or b"{}")
    except ValueError:
        raise ClientError("bad_request", "Send the batch as JSON.") from None
    if not isinstance(data, dict):
        raise ClientError("bad_request", "Send the batch as a JSON object.")
    return data


def _images(data: dict) -> list[int]:
    ids = data.get("images") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ClientError("bad_images", "images must be a list of image ids.")
    return ids


@login_required
@require_POST
def batch_estimate(request: HttpRequest) -> JsonResponse:
    try:
        data = _payload(request)
        model = model_get_for_user(request.user, data.get("model"))
        fields = batches.fields_clean(data.get("fields"))
        ids = _images(data)
        if len(ids) > settings.BATCH_MAX_ITEMS:
            raise ClientError(
                "too_many", f"A batch takes at most {settings.BATCH_MAX_ITEMS} images."
            )
        found = batches.images_for_batch(request.user, ids)
        guess = batches.estimate(
            user=request.user,
            team=current_team_for(request.user),
            model=model,
            question=str(data.get("question") or ""),
            fields=fields,
            images=found,
        )
    except ClientError as exc:
        return _error(400, exc.code, exc.message)
    return JsonResponse(guess)


@login_required
@require_POST
def batch_create(request: HttpRequest) -> JsonResponse:
    try:
        data = _payload(request)
        model = model_get_for_user(request.user, data.get("model"))
        batch = tasks.batch_start(
            user=request.user,
            model=model,
            question=str(data.get("question") or ""),
            fields_raw=data.get("fields"),
            attachment_ids=_images(data),
            name=str(data.get("name") or ""),
            address=client_ip(request),
        )
    except ClientError as exc:
        return _error(400, exc.code, exc.message)
    return JsonResponse({"id": batch.pk, "url": reverse("batch", args=[batch.pk])}, status=201)


async def batch_action(request: HttpRequest, pk: int, action: str) -> JsonResponse:
    if request.method != "POST":
        return _error(405, "method", "Use POST.")
    user = await request.auser()
    if not user.is_authenticated:
        return _error(401, "login", "Log in first.")
    try:
        batch = await sync_to_async(batch_get_for_user)(user, pk)
        if action not in ("pause", "resume", "cancel", "retry"):
            raise Http404
        batch = await sync_to_async(tasks.batch_control)(
            batch=batch, action=action, actor=user, address=client_ip(request)
        )
        state = await sync_to_async(batches.batch_state)(batch_id=batch.pk)
    except Http404:
        return _error(404, "not_found", "No such batch.")
    except ClientError as exc:
        return _error(400, exc.code, exc.message)
    await events.batch_publish(batch.pk, events.frame_batch_state(state=state))
    return JsonResponse(state)


@login_required
@require_POST
def batch_delete(request: HttpRequest, pk: int) -> JsonResponse:
    batch = batch_get_for_user(request.user, pk)
    batches.batch_delete(batch=batch, actor=request.user, address=client_ip(request))
    return JsonResponse({"deleted": pk, "url": reverse("batches")})


@login_required
@require_POST
def batch_item_open(request: HttpRequest, pk: int, item_pk: int) -> JsonResponse:
    item = batch_item_get_for_user(request.user, pk, item_pk)
    conversation = batches.item_open_conversation(item=item, user=request.user)
    return JsonResponse({"url": reverse("conversation", args=[conversation.pk])}, status=201)


# ---- exports ----------------------------------------------------------------------------------


def _download(request, batch, text: str, *, fmt: str, name: str, content_type: str):
    batches.batch_exported(batch=batch, actor=request.user, fmt=fmt, address=client_ip(request))
    response = HttpResponse(text.encode("utf-8"), content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@login_required
@require_GET
def batch_export_csv(request: HttpRequest, pk: int) -> HttpResponse:
    batch = batch_get_for_user(request.user, pk)
    return _download(
        request,
        batch,
        batches.export_csv(batch),
        fmt="csv",
        name=f"batch-{pk}.csv",
        content_type="text/csv; charset=utf-8",
    )


@login_required
@require_GET
def batch_export_excel(request: HttpRequest, pk: int) -> HttpResponse:
    batch = batch_get_for_user(request.user, pk)
    return _download(
        request,
        batch,
        batches.export_csv(batch, excel=True),
        fmt="excel-csv",
        name=f"batch-{pk}-excel.csv",
        content_type="text/csv; charset=utf-8",
    )


@login_required
@require_GET
def batch_export_jsonl(request: HttpRequest, pk: int) -> HttpResponse:
    batch = batch_get_for_user(request.user, pk)
    return _download(
        request,
        batch,
        batches.export_jsonl(batch),
        fmt="jsonl",
        name=f"batch-{pk}.jsonl",
        content_type="application/x-ndjson; charset=utf-8",
    )
