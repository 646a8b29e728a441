"""PDF pages as images, rendered with pypdfium2 (PDFium).

Contract (pure, synchronous; the upload views run it in the image worker pool, never on the
event loop):

* ``is_pdf(data)`` recognises a PDF from its bytes.
* ``pdf_preview(data, ...)`` opens the document (refusing encrypted, corrupt and too long ones
  before any page is rendered), and returns its page count, a small thumbnail of the first pages
  and, for every page, the size its image will be sent at.
* ``pdf_page_count(data, ...)`` opens it with the same refusals and only counts its pages (the
  Batch page expands a PDF to one item per page, rendering one page at a time).
* ``pdf_render_pages(data, pages, ...)`` renders the picked pages at a legible resolution and
  runs each through the image pipeline (images.process_image: sizing for legibility, tiles for
  very tall pages, the byte budget). A page too large to render within the pixel limit is
  refused before it is rendered.
* Every refusal is a :class:`PdfError` whose ``str()`` is a user-facing reason. The PDF itself is
  never stored and never sent to a model: only its rendered pages are.

PDFium is not thread-safe, so every call into it holds one process-wide lock: two PDFs render
one after the other, while image uploads keep the other worker threads.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from . import images

PDF_MAGIC = b"%PDF-"
POINTS_PER_INCH = 72
# 200 dpi: 10 pt body text becomes ~28 px tall, well above the ~10 px where vision models start
# misreading; an A4 page is 1654×2339 px, under the default 3000 px edge (no resize needed).
DEFAULT_RENDER_DPI = 200
# Never render below this: a page whose 72 dpi rendering is over the pixel limit is refused.
MIN_RENDER_DPI = 72
DEFAULT_MAX_PAGES = 200
DEFAULT_MAX_PAGE_PIXELS = 40_000_000
PREVIEW_EDGE = 160
# Thumbnails for the first pages only: a long document still lists every page to pick from.
DEFAULT_PREVIEW_PAGES = 48

_LOCK = threading.Lock()


class PdfError(images.ImageError):
    """A user-facing reason a PDF was refused."""


@dataclass(frozen=True, slots=True)
class PagePreview:
    number: int  # 1-based
    send_size: str  # what the model will get, e.g. "1654×2339" or "3 tiles of up to 1080×3000"
    thumbnail: bytes | None  # small WebP, for the first pages only


@dataclass(frozen=True, slots=True)
class PdfPreview:
    page_count: int
    pages: list[PagePreview]


@dataclass(frozen=True, slots=True)
class RenderedPage:
    number: int
    processed: images.ProcessedUpload


def is_pdf(data: bytes) -> bool:
    # The header may follow a little junk (the spec allows it within the first 1,024 bytes).
    return PDF_MAGIC in data[:1024]


def _open(data: bytes, *, max_pages: int, name: str) -> pdfium.PdfDocument:
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD:
            raise PdfError(
                f"{name} is encrypted (password-protected). Save an unprotected copy, or take "
                "screenshots of the pages, and attach that instead."
            ) from None
        if exc.err_code == pdfium_c.FPDF_ERR_SECURITY:
            raise PdfError(
                f"{name} uses a security scheme that cannot be opened here. Save an "
                "unprotected copy and attach that instead."
            ) from None
        raise PdfError(
            f"{name} could not be read as a PDF; it may be truncated or corrupt."
        ) from None
    count = len(document)  # from the page tree: nothing is rendered yet
    if count == 0:
        document.close()
        raise PdfError(f"{name} has no pages.")
    if count > max_pages:
        document.close()
        raise PdfError(
            f"{name} has {count:,} pages; the limit is {max_pages:,}. Attach a shorter "
            "extract (print the pages you need to a new PDF)."
        )
    return document


def _render_scale(
    width_pt: float, height_pt: float, *, dpi: int, max_edge: int, max_page_pixels: int
) -> float | None:
    """Points-to-pixels scale for a legible page that the pipeline will not have to shrink much;
    None when the page cannot be rendered within the pixel limit at 72 dpi or more."""
    scale = dpi / POINTS_PER_INCH
    long_px, short_px = max(width_pt, height_pt) * scale, min(width_pt, height_pt) * scale
    fit = max_edge / long_px if long_px else 1
    if fit < 1 and short_px * fit >= min(short_px, images.MIN_SHORT_SIDE):
        # The pipeline would resize it to fit anyway: render at that size directly.
        return scale * fit
    # A long page is tiled at this scale: its whole bitmap must fit the pixel limit.
    pixels = width_pt * scale * height_pt * scale
    if pixels > max_page_pixels:
        scale *= (max_page_pixels / pixels) ** 0.5
        if scale < MIN_RENDER_DPI / POINTS_PER_INCH:
            return None
    return scale


def _page_pixels(page, scale: float) -> tuple[int, int]:
    width, height = page.get_size()
    return max(1, round(width * scale)), max(1, round(height * scale))


def _too_large(number: int, name: str, page) -> PdfError:
    width, height = page.get_size()
    return PdfError(
        f"Page {number} of {name} is too large to render ({width / POINTS_PER_INCH:.0f}×"
        f"{height / POINTS_PER_INCH:.0f} in). Take a screenshot of the part you need instead."
    )


def _render(page, scale: float) -> Image.Image:
    # Grey-scale anti-aliasing and no LCD text: deterministic pixels, whatever the screen.
    bitmap = page.render(scale=scale, draw_annots=True, may_draw_forms=True)
    try:
        return bitmap.to_pil().convert("RGB")
    finally:
        bitmap.close()


def pdf_preview(
    data: bytes,
    *,
    name: str = "The PDF",
    max_pages: int = DEFAULT_MAX_PAGES,
    preview_pages: int = DEFAULT_PREVIEW_PAGES,
    dpi: int = DEFAULT_RENDER_DPI,
    max_edge: int = images.DEFAULT_MAX_EDGE,
    max_tiles: int = images.DEFAULT_MAX_TILES,
    max_page_pixels: int = DEFAULT_MAX_PAGE_PIXELS,
) -> PdfPreview:
    with _LOCK:
        document = _open(data, max_pages=max_pages, name=name)
        try:
            pages = []
            for index in range(len(document)):
                page = document[index]
                try:
                    width, height = page.get_size()
                    scale = _render_scale(
                        width, height, dpi=dpi, max_edge=max_edge, max_page_pixels=max_page_pixels
                    )
                    if scale is None:
                        send_size = "too large to render"
                    else:
                        send_size = images.plan_label(
                            *_page_pixels(page, scale), max_edge=max_edge, max_tiles=max_tiles
                        )
                    thumbnail = None
                    if index < preview_pages and scale is not None:
                        thumb_scale = PREVIEW_EDGE / max(width, height, 1)
                        image = _render(page, thumb_scale)
                        buffer = io.BytesIO()
                        image.save(buffer, "WEBP", quality=70, method=4)
                        thumbnail = buffer.getvalue()
                finally:
                    page.close()
                pages.append(PagePreview(index + 1, send_size, thumbnail))
            return PdfPreview(page_count=len(document), pages=pages)
        finally:
            document.close()


def pdf_page_count(
    data: bytes, *, name: str = "The PDF", max_pages: int = DEFAULT_MAX_PAGES
) -> int:
    """The page count from the page tree (nothing rendered); refusals as in pdf_preview."""
    with _LOCK:
        document = _open(data, max_pages=max_pages, name=name)
        try:
            return len(document)
        finally:
            document.close()


def pdf_render_pages(
    data: bytes,
    pages: list[int],
    *,
    name: str = "The PDF",
    max_pages: int = DEFAULT_MAX_PAGES,
    dpi: int = DEFAULT_RENDER_DPI,
    max_edge: int = images.DEFAULT_MAX_EDGE,
    max_output_bytes: int = images.DEFAULT_MAX_OUTPUT_BYTES,
    max_tiles: int = images.DEFAULT_MAX_TILES,
    max_page_pixels: int = DEFAULT_MAX_PAGE_PIXELS,
) -> list[RenderedPage]:
    """Render `pages` (1-based, in the order given) and prepare each as an image upload."""
    rendered: list[tuple[int, Image.Image]] = []
    with _LOCK:
        document = _open(data, max_pages=max_pages, name=name)
        try:
            count = len(document)
            for number in pages:
                if not 1 <= number <= count:
                    raise PdfError(f"{name} has no page {number} (it has {count}).")
                page = document[number - 1]
                try:
                    scale = _render_scale(
                        *page.get_size(),
                        dpi=dpi,
                        max_edge=max_edge,
                        max_page_pixels=max_page_pixels,
                    )
                    if scale is None:
                        raise _too_large(number, name, page)
                    rendered.append((number, _render(page, scale)))
                finally:
                    page.close()
        finally:
            document.close()
    # Pillow work outside the lock: another PDF can render meanwhile.
    return [
        RenderedPage(
            number,
            images.process_image(
                image,
                source_format="PDF",
                max_edge=max_edge,
                max_output_bytes=max_output_bytes,
                max_tiles=max_tiles,
            ),
        )
        for number, image in rendered
    ]
