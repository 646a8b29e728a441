"""Turn an untrusted image upload into model-ready image bytes.

Contract (pure, synchronous; the app calls it from a worker thread):

* ``process_upload(data, ...)`` accepts PNG, JPEG, WebP, GIF (first frame only), BMP, TIFF and
  HEIC/HEIF, detected from the bytes themselves, never from a file name or MIME type.
  Anything else, or anything truncated, corrupt, too large in bytes or in pixels, raises
  :class:`ImageError`, whose ``str()`` is a user-facing reason.
* The result is EXIF-oriented, converted to sRGB and stripped of all metadata (EXIF/GPS, XMP,
  comments, ICC). Each part is PNG, JPEG or WebP, fits ``max_edge`` and ``max_output_bytes``,
  and is never upscaled. Very tall (or wide) images are split into ordered, overlapping tiles
  instead of being shrunk until their text is unreadable.
* Output is deterministic: the same input bytes (and the same Pillow build) give byte-identical
  output, which keeps the model provider's prompt cache warm.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pillow_heif
from PIL import ExifTags, Image, ImageChops, ImageCms, ImageOps

# HEIC/HEIF is what iPhones upload by default; Pillow needs pillow-heif's opener to read it.
pillow_heif.register_heif_opener()

PHOTO_FORMATS = frozenset({"JPEG", "HEIF"})
ACCEPTED_TYPES_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF or HEIC/HEIF"

# Pillow format ids we let Image.open try, so detection is by content and strictly allow-listed
# (no EPS/PDF/ICO/PSD/... decoders are ever reached). "MPO" is how Pillow reports the many
# camera JPEGs that carry a multi-picture extension; it is still a JPEG.
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "HEIF")
_FORMAT_NAMES = {"MPO": "JPEG"}

# 50 megapixels: admits every current phone camera (a 48 MP sensor is 8064x6048 = 48.8 MP)
# while bounding the decoded bitmap to ~200 MB (RGBA). It is also below Pillow's own
# DecompressionBombWarning threshold (~89 MP), so accepted images never trigger a warning.
# Pillow independently refuses anything over ~179 MP while reading the header.
DEFAULT_MAX_PIXELS = 50_000_000

# Longest edge sent to the model. Moonshot documents no numeric server limit; their own client
# downsizes to a 2000 px longest edge by default and later raised that to 3000 px, so 3000 px is
# the largest size we know the vision encoder is fed in practice. Larger would only cost
# tokens/bytes for detail the provider may discard anyway.
DEFAULT_MAX_EDGE = 3000

# Raw bytes per encoded image. The issue notes Kimi Code caps a whole message at 2 MB; base64
# inflates by 4/3, so 1.5 MB raw is ~2 MB on the wire, and anything bigger is re-encoded
# (lossy, then smaller) until it fits.
DEFAULT_MAX_OUTPUT_BYTES = 1_500_000

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024

# Never shrink the short side below this (unless the image is already narrower). A 1080 px wide
# phone or half-screen desktop screenshot renders ~12 px UI text; shrinking it further pushes
# glyphs under ~10 px, i.e. below one 14 px vision-encoder patch per character, where models
# start misreading text. Tall images that would need that are tiled instead.
MIN_SHORT_SIDE = 1080

# Tiles overlap by a few text lines so a line cut by one tile boundary is whole in the other.
TILE_OVERLAP = 64

# A 1080 px wide capture up to ~23,500 px tall still tiles at full width; beyond that the image
# is scaled down so the upload stays at most this many model images.
DEFAULT_MAX_TILES = 8

THUMBNAIL_EDGE = 256

# Fraction of horizontally adjacent pixel pairs that are exactly equal. UI screenshots and
# diagrams are mostly flat fills (typically > 80 %); camera photos have sensor noise and are
# nearly never flat (< 10 %). At or above this, the image is kept lossless.
SCREENSHOT_FLAT_FRACTION = 0.5

# Lossy fallbacks, best first: (JPEG/WebP quality, JPEG chroma subsampling). 4:4:4 keeps small
# coloured text crisp; 4:2:0 is only used once the byte budget forces it.
_LOSSY_LADDER = ((90, 0), (85, 0), (80, 2), (70, 2), (60, 2))
# When no encoding fits the byte budget, shrink both sides by this factor and try again.
_SHRINK_STEP = 0.75
_MIN_EDGE = 16

# zlib level 6 without Pillow's `optimize` (level 9 + a search): measured on a 3000x1688
# screenshot 218 ms instead of 425 ms for 0.03 % more bytes, on a 1080x3000 tile 79 ms instead
# of 504 ms for 3 % more (bench/images.py shapes, one core).
PNG_COMPRESS_LEVEL = 6

_OUTPUT_MIMES = frozenset({"image/png", "image/jpeg", "image/webp"})
_MB = 1024 * 1024
_WEBP_MAX_EDGE = 16383
_WHITE = {"RGB": (255, 255, 255), "L": 255}


class ImageError(ValueError):
    """A user-facing, clear reason an upload was refused (str(err) is shown to the user)."""


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    data: bytes  # the encoded bytes that will be sent to the model
    mime: str  # exactly one of "image/png", "image/jpeg", "image/webp"
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ProcessedUpload:
    parts: list[ProcessedImage]  # 1 item normally; ordered tiles for a very tall/wide image
    thumbnail: bytes  # small preview, at most THUMBNAIL_EDGE px on its longest edge
    thumbnail_mime: str
    source_format: str  # "PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "HEIF"
    source_width: int  # after EXIF orientation
    source_height: int


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (used to deduplicate uploads and key caches)."""
    return hashlib.sha256(data).hexdigest()


def data_url(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,<data>`` for the model API; deterministic for the same input."""
    if mime not in _OUTPUT_MIMES and mime != "image/gif":
        raise ValueError(f"not an image MIME type the model accepts: {mime!r}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def process_upload(
    data: bytes,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_edge: int = DEFAULT_MAX_EDGE,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> ProcessedUpload:
    """Validate, normalise, size and encode one uploaded image. Raises ImageError if refused."""
    if not data:
        raise ImageError(f"The file is empty. Please upload an image ({ACCEPTED_TYPES_TEXT}).")
    if len(data) > max_upload_bytes:
        raise ImageError(
            f"The file is too large ({_mb(len(data), up=True)} MB); "
            f"the upload limit is {_mb(max_upload_bytes)} MB."
        )

    source_format, im = _decode(data, max_pixels)
    return process_image(
        im,
        source_format=source_format,
        max_edge=max_edge,
        max_output_bytes=max_output_bytes,
        max_tiles=max_tiles,
    )


def process_image(
    im: Image.Image,
    *,
    source_format: str,
    max_edge: int = DEFAULT_MAX_EDGE,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> ProcessedUpload:
    """Size and encode an already decoded, trusted image (an upload after _decode, a rendered
    PDF page, a video frame). Metadata in ``im.info`` other than its ICC profile is dropped."""
    im = _to_srgb(im)
    im = _drop_opaque_alpha(im)
    source_width, source_height = im.size

    # Camera formats hold photos, already lossy: PNG would not bring their detail back, only
    # their bytes up, and bicubic resampling is indistinguishable there after JPEG encoding and
    # a third cheaper. Everything else may carry small text, which LANCZOS keeps sharpest.
    photo = source_format in PHOTO_FORMATS
    resample = Image.Resampling.BICUBIC if photo else Image.Resampling.LANCZOS
    sized, tiles = _plan(im, max_edge=max_edge, max_tiles=max_tiles, resample=resample)
    lossless = not photo and _prefers_lossless(sized)
    parts = [_encode_within_budget(tile, lossless, max_output_bytes) for tile in tiles]

    scale = min(1.0, THUMBNAIL_EDGE / max(sized.size))
    thumb_size = (max(1, round(sized.width * scale)), max(1, round(sized.height * scale)))
    # reducing_gap: a cheap box reduction first, then LANCZOS over the last steps.
    thumb = sized.resize(thumb_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return ProcessedUpload(
        parts=parts,
        thumbnail=_save(thumb, "WEBP", quality=80, method=4),
        thumbnail_mime="image/webp",
        source_format=source_format,
        source_width=source_width,
        source_height=source_height,
    )


# --- decoding ---------------------------------------------------------------------------------


def _mb(n: int, *, up: bool = False) -> str:
    # One decimal; rounding a too-large size up so it never reads as equal to the limit.
    tenths = math.ceil(n * 10 / _MB) if up else round(n * 10 / _MB)
    return f"{tenths / 10:.1f}".removesuffix(".0")


def _decode(data: bytes, max_pixels: int) -> tuple[str, Image.Image]:
    """Identify, bomb-check, decode (first frame only) and EXIF-orient the image."""
    unsupported = ImageError(
        f"This file is not a supported image. Please upload {ACCEPTED_TYPES_TEXT}."
    )
    too_many = (
        "The image is too large: {dims}the limit is "
        f"{max_pixels / 1_000_000:g} megapixels. Please crop or downscale it."
    )
    try:
        im = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own header-time guard (~179 MP) fires before ours can.
        raise ImageError(too_many.format(dims="")) from None
    except Exception:
        # Untrusted bytes reach many parsers; whatever they raise means "not an image we read".
        raise unsupported from None

    # Image.open only parsed the header: check the pixel count before any pixel is decoded.
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        dims = f"{width}x{height} pixels ({width * height / 1_000_000:.1f} megapixels); "
        raise ImageError(too_many.format(dims=dims))

    fmt = _FORMAT_NAMES.get(im.format or "", im.format or "")
    try:
        # Decodes the current frame only, which right after open is frame 1 of a GIF/WebP
        # animation, page 1 of a TIFF and the primary image of a HEIF.
        im.load()
    except Exception:
        im.close()
        raise ImageError(
            "The image could not be read; it may be truncated or corrupt. "
            f"Please upload a complete {ACCEPTED_TYPES_TEXT} image."
        ) from None

    try:
        # Only a real rotation or flip costs a new image; upright images are used as they are.
        upright = im.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1)
        oriented = im if upright else ImageOps.exif_transpose(im)
    except Exception:
        # Damaged EXIF should not cost the user their upload; show the pixels as stored.
        oriented = im
    # exif_transpose drops only the orientation tag; keep the ICC profile for _to_srgb and
    # nothing else, so no metadata can leak into an encoder's defaults.
    icc = im.info.get("icc_profile")
    transparency = im.info.get("transparency")
    oriented.info = {}
    if icc:
        oriented.info["icc_profile"] = icc
    if transparency is not None and oriented.mode in ("P", "L", "RGB"):
        oriented.info["transparency"] = transparency
    return fmt, oriented


# --- colour ----------------------------------------------------------------------------------


def _to_srgb(im: Image.Image) -> Image.Image:
    """Return an L, LA, RGB or RGBA image in sRGB with an empty ``info`` (no metadata)."""
    icc = im.info.get("icc_profile")
    if im.mode == "CMYK":
        # CMYK must be converted through its own profile while still CMYK, when it has one.
        out = _apply_icc(im, icc, "RGB") if icc else None
        im = out if out is not None else im.convert("RGB")
    else:
        im = _normalise_mode(im)
        if icc:
            alpha = im.getchannel("A") if im.mode in ("RGBA", "LA") else None
            base = im.convert(im.mode[:-1]) if alpha is not None else im
            out = _apply_icc(base, icc, "RGB")
            if out is not None:
                if alpha is not None:
                    out.putalpha(alpha)
                im = out
    im.info = {}
    return im


def _apply_icc(im: Image.Image, icc: bytes, mode: str) -> Image.Image | None:
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        # Built per call (it is cheap): LittleCMS profile objects are not shared across the
        # worker threads this runs in.
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return ImageCms.profileToProfile(im, source, srgb, outputMode=mode)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        # A broken profile, or one that does not match the pixel format: the pixels are
        # still usable as-is, which is what every viewer would show.
        return None


def _normalise_mode(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to L, LA, RGB or RGBA without losing range or transparency."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        if mode in ("L", "RGB") and "transparency" in im.info:
            return im.convert(mode + "A" if mode == "L" else "RGBA")
        return im
    if mode in ("P", "PA"):
        return im.convert("RGBA" if im.has_transparency_data else "RGB")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I;16"):
        # 16-bit grey: scale 0..65535 to 0..255. A plain convert("L") clips, turning
        # everything above 255 (i.e. nearly every pixel) white.
        return im.point(lambda v: v * (1 / 257)).convert("L")
    if mode == "I":
        low, high = im.getextrema()
        if high <= 255:
            return im.convert("L")
        return im.point(lambda v: v * (1 / 257)).convert("L")  # 16-bit data in a 32-bit image
    if mode == "F":
        low, high = im.getextrema()
        if low >= 0 and high <= 1:
            return im.point(lambda v: v * 255).convert("L")
        span = (high - low) or 1
        return im.point(lambda v: (v - low) * (255 / span)).convert("L")
    if mode in ("La", "RGBa"):
        return im.convert(mode.upper() if mode == "La" else "RGBA")
    if mode in ("LAB", "HSV", "YCbCr", "RGBX"):
        return im.convert("RGB")
    return im.convert("RGBA")  # pragma: no cover - any other mode Pillow might add


def _drop_opaque_alpha(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") and im.getchannel("A").getextrema() == (255, 255):
        return im.convert(im.mode[:-1])
    return im


# --- sizing ----------------------------------------------------------------------------------


def plan_geometry(
    width: int, height: int, *, max_edge: int, max_tiles: int
) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """(the image's size at its final scale, the crop box of each part in reading order), from
    its dimensions alone: what will be sent can be told before anything is decoded."""
    long_side, short_side = max(width, height), min(width, height)
    if long_side <= max_edge:
        return (width, height), [(0, 0, width, height)]  # never upscale

    # The short side we refuse to go below (unless it is already smaller).
    floor = min(short_side, MIN_SHORT_SIDE, max_edge)
    fit = max_edge / long_side
    if round(short_side * fit) >= floor:
        size = _scaled((width, height), fit)
        return size, [(0, 0, *size)]

    # Too elongated to fit in one image and stay legible: keep the short side as large as
    # allowed and cut the long side into overlapping tiles, top to bottom (or left to right).
    overlap = min(TILE_OVERLAP, max_edge // 4)
    scale = min(short_side, max_edge) / short_side
    longest_tiled = max_tiles * (max_edge - overlap) + overlap
    if long_side * scale > longest_tiled:
        # More tiles than we send in one upload: shrink below the legibility floor rather than
        # refuse; a smaller image the model can partly read beats no image.
        scale = longest_tiled / long_side
    sized = _scaled((width, height), scale) if scale < 1 else (width, height)
    tall = sized[1] >= sized[0]
    length = sized[1] if tall else sized[0]

    count = max(1, math.ceil((length - overlap) / (max_edge - overlap)))
    tile = min(length, math.ceil((length + (count - 1) * overlap) / count))
    starts = [0] if count == 1 else [round(i * (length - tile) / (count - 1)) for i in range(count)]
    boxes = [(0, s, sized[0], s + tile) if tall else (s, 0, s + tile, sized[1]) for s in starts]
    return sized, boxes


def plan_label(width: int, height: int, *, max_edge: int, max_tiles: int) -> str:
    """What a width×height image will be sent as: "1568×882" or "3 tiles of up to 1080×3000"."""
    _, boxes = plan_geometry(width, height, max_edge=max_edge, max_tiles=max_tiles)
    if len(boxes) == 1:
        return f"{boxes[0][2] - boxes[0][0]}×{boxes[0][3] - boxes[0][1]}"
    tile_width = max(b[2] - b[0] for b in boxes)
    tile_height = max(b[3] - b[1] for b in boxes)
    return f"{len(boxes)} tiles of up to {tile_width}×{tile_height}"


def _plan(
    im: Image.Image, *, max_edge: int, max_tiles: int, resample: Image.Resampling
) -> tuple[Image.Image, list[Image.Image]]:
    """Return (the image at its final scale, its parts in reading order)."""
    size, boxes = plan_geometry(im.width, im.height, max_edge=max_edge, max_tiles=max_tiles)
    sized = im if size == im.size else im.resize(size, resample)
    if len(boxes) == 1 and boxes[0] == (0, 0, *size):
        return sized, [sized]
    return sized, [sized.crop(box) for box in boxes]


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _resize(
    im: Image.Image, scale: float, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    size = _scaled(im.size, scale)
    if size == im.size:
        return im
    # Pillow premultiplies alpha while resampling.
    return im.resize(size, resample)


# --- encoding --------------------------------------------------------------------------------


def _prefers_lossless(im: Image.Image) -> bool:
    """Screenshots, diagrams and anything transparent stay PNG; photos go lossy."""
    if im.mode in ("RGBA", "LA"):
        return True
    if im.mode == "RGB" and im.getcolors(256) is not None:
        return True  # fits a palette exactly: PNG is both lossless and small
    width, height = im.size
    if width < 2:
        return True
    diff = ImageChops.difference(im.crop((1, 0, width, height)), im.crop((0, 0, width - 1, height)))
    if diff.mode == "RGB":
        red, green, blue = diff.split()
        diff = ImageChops.lighter(ImageChops.lighter(red, green), blue)
    flat = diff.histogram()[0] / ((width - 1) * height)
    return flat >= SCREENSHOT_FLAT_FRACTION


def _encode_within_budget(im: Image.Image, lossless: bool, budget: int) -> ProcessedImage:
    """First encoding that fits the byte budget wins; shrink dimensions if none does."""
    while True:
        for mime, data in _candidates(im, lossless):
            if len(data) <= budget:
                return ProcessedImage(data=data, mime=mime, width=im.width, height=im.height)
        if min(im.size) * _SHRINK_STEP < _MIN_EDGE:
            raise ImageError(
                f"The image could not be compressed below {_mb(budget)} MB. Please upload a "
                "smaller image."
            )
        im = _resize(im, _SHRINK_STEP)


def _candidates(im: Image.Image, lossless: bool) -> Iterator[tuple[str, bytes]]:
    """Yield (mime, bytes) in order of preference; lazily, so unneeded ones aren't encoded."""
    if lossless:
        yield "image/png", _encode_png(im)
    if im.mode in ("RGBA", "LA"):
        # Keep transparency: lossy WebP has an alpha channel, JPEG does not.
        if max(im.size) <= _WEBP_MAX_EDGE:
            for quality, _ in _LOSSY_LADDER:
                yield "image/webp", _save(im, "WEBP", quality=quality, method=4)
        flat = _flatten(im)
    else:
        flat = im
    for quality, subsampling in _LOSSY_LADDER:
        yield "image/jpeg", _encode_jpeg(flat, quality, subsampling)


def _encode_jpeg(im: Image.Image, quality: int, subsampling: int) -> bytes:
    # Optimised Huffman tables are a few % smaller for the same pixels, but Pillow gives libjpeg
    # a one-shot buffer of 1 byte/pixel when optimising, which near-random content overflows
    # (libjpeg then fails with "Suspension not allowed here"): only then encode without them.
    try:
        return _save(im, "JPEG", quality=quality, subsampling=subsampling, optimize=True)
    except OSError:
        return _save(im, "JPEG", quality=quality, subsampling=subsampling)


def _encode_png(im: Image.Image) -> bytes:
    if im.mode == "RGB":
        colours = im.getcolors(256)
        if colours is not None:
            # <= 256 colours: an exact palette is lossless and roughly a third of the size.
            palette = Image.new("P", (1, 1))
            flat = [channel for _, rgb in sorted(colours, key=lambda c: c[1]) for channel in rgb]
            palette.putpalette(flat)
            indexed = im.quantize(palette=palette, dither=Image.Dither.NONE)
            if ImageChops.difference(indexed.convert("RGB"), im).getbbox() is None:
                return _save(indexed, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return _save(im, "PNG", compress_level=PNG_COMPRESS_LEVEL)


def _flatten(im: Image.Image) -> Image.Image:
    """Composite a transparent image onto white, for formats without alpha."""
    base_mode = im.mode[:-1]
    canvas = Image.new(base_mode, im.size, _WHITE[base_mode])
    canvas.paste(im.convert(base_mode), mask=im.getchannel("A"))
    return canvas


def _save(im: Image.Image, fmt: str, **options) -> bytes:
    # Encoders fall back to im.info for some metadata (PNG: ICC, transparency; JPEG: comment).
    # Everything reaching here has an empty info, but clear it again defensively.
    im.info = {}
    buffer = io.BytesIO()
    im.save(buffer, fmt, **options)
    return buffer.getvalue()
