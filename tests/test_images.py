"""Tests for chatapp.images. Plain pytest, no Django; every image is generated in memory."""

from __future__ import annotations

import base64
import hashlib
import io
import resource

import pytest
from PIL import Image, ImageChops, ImageFile

from chatapp import images
from chatapp.images import (
    ACCEPTED_TYPES_TEXT,
    DEFAULT_MAX_EDGE,
    MIN_SHORT_SIDE,
    ImageError,
    ProcessedImage,
    data_url,
    process_upload,
    sha256_hex,
)
from tests import image_factories as factories

OUTPUT_MIMES = {"image/png", "image/jpeg", "image/webp"}
MIME_OF_FORMAT = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def open_part(part: ProcessedImage) -> Image.Image:
    im = Image.open(io.BytesIO(part.data))
    assert MIME_OF_FORMAT[im.format] == part.mime
    assert im.size == (part.width, part.height)
    return im


def assert_no_metadata(data: bytes) -> None:
    im = Image.open(io.BytesIO(data))
    assert not im.getexif()
    for key in ("exif", "icc_profile", "xmp", "XML:com.adobe.xmp", "comment", "transparency"):
        assert key not in im.info, key
    for marker in (b"Exif\x00", b"ICC_PROFILE", b"ns.adobe.com/xap", b"GPS", b"TestCam"):
        assert marker not in data, marker
    if im.format == "PNG":
        for chunk in (b"eXIf", b"iCCP", b"iTXt", b"tEXt", b"zTXt"):
            assert chunk not in data, chunk


def assert_refused_as_unsupported(data: bytes) -> None:
    with pytest.raises(ImageError) as caught:
        process_upload(data)
    assert ACCEPTED_TYPES_TEXT in str(caught.value)


def close_to(actual, expected, tolerance=6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- refused uploads ---------------------------------------------------------------------------


def test_truncated_png_is_refused():
    whole = factories.encode(factories.screenshot(400, 300), "PNG")
    assert_refused_as_unsupported(whole[: len(whole) // 2])


def test_truncated_jpeg_is_refused():
    whole = factories.encode(factories.photo(400, 300), "JPEG")
    assert_refused_as_unsupported(whole[: len(whole) // 2])


def test_corrupt_png_body_is_refused():
    whole = bytearray(factories.encode(factories.photo(200, 100), "PNG"))
    whole[200:260] = bytes(60)  # smash the compressed pixel data
    assert_refused_as_unsupported(bytes(whole))


def test_text_file_named_png_is_refused():
    assert_refused_as_unsupported(b"just some notes, saved as notes.png\n" * 10)


def test_zip_is_refused():
    assert_refused_as_unsupported(factories.zip_bytes())


@pytest.mark.parametrize(
    "data",
    [factories.SVG_WITH_SCRIPT, b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"],
    ids=["svg-with-script", "pdf"],
)
def test_svg_and_pdf_are_refused(data):
    assert_refused_as_unsupported(data)


def test_empty_file_is_refused():
    assert_refused_as_unsupported(b"")


def test_unlisted_pillow_format_is_refused():
    # Pillow can read ICO, but it is not on the allow-list.
    ico = factories.encode(Image.new("RGB", (16, 16), "red"), "ICO")
    assert Image.open(io.BytesIO(ico)).format == "ICO"
    assert_refused_as_unsupported(ico)


@pytest.fixture
def load_spy(monkeypatch):
    """Records every pixel decode (ImageFile.load), to prove refusals happen before it."""
    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_30000_square_png_is_refused_before_decoding_pixels(load_spy):
    bomb = factories.bomb_png(30_000, 30_000)
    assert len(bomb) < 200_000  # tiny file, 900 megapixels
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="too large.*megapixels"):
        process_upload(bomb)
    assert load_spy == []  # refused from the header alone
    # Decoding would need ~900 MB (one byte per pixel); peak RSS (KiB on Linux) barely moves.
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 100


def test_pixel_limit_is_checked_from_the_header(load_spy):
    # 64 MP: under Pillow's own bomb threshold, so this is our max_pixels check.
    with pytest.raises(ImageError, match=r"8000x8000 pixels \(64\.0 megapixels\).*limit is 50 "):
        process_upload(factories.bomb_png(8000, 8000))
    real = factories.encode(factories.screenshot(1200, 1000), "PNG")
    with pytest.raises(ImageError, match="limit is 1 megapixels"):
        process_upload(real, max_pixels=1_000_000)
    assert load_spy == []
    assert process_upload(real, max_pixels=1_200_000).source_width == 1200


def test_oversized_upload_is_refused_with_the_limit_in_mb():
    with pytest.raises(ImageError, match=r"20\.1 MB\).*upload limit is 20 MB"):
        process_upload(bytes(20 * 1024 * 1024 + 1))
    with pytest.raises(ImageError, match="upload limit is 0.1 MB"):
        process_upload(bytes(200_000), max_upload_bytes=100_000)


# --- formats and colour ------------------------------------------------------------------------


def test_animated_gif_uses_the_first_frame_only():
    result = process_upload(factories.animated_gif())
    assert result.source_format == "GIF"
    assert len(result.parts) == 1
    im = open_part(result.parts[0]).convert("RGB")
    assert im.size == (40, 30)
    assert im.getcolors() == [(40 * 30, factories.MARKER)]  # frame 1 is red; 2-3 are not


def test_cmyk_jpeg_colours_are_correct():
    result = process_upload(factories.cmyk_jpeg())
    assert result.source_format == "JPEG"
    im = open_part(result.parts[0]).convert("RGB")
    assert close_to(im.getpixel((8, 16)), (0, 255, 0), 12)  # cyan + yellow ink
    assert close_to(im.getpixel((56, 16)), (255, 0, 0), 12)  # magenta + yellow ink


@pytest.mark.parametrize(("value", "expected"), [(0x8080, 128), (0xFFFF, 255), (0x0000, 0)])
def test_16_bit_png_is_scaled_not_clipped(value, expected):
    raw = factories.grey16_png(value)
    assert Image.open(io.BytesIO(raw)).mode.startswith("I")  # really a 16-bit input
    im = open_part(process_upload(raw).parts[0]).convert("L")
    assert abs(im.getpixel((10, 10)) - expected) <= 1


def test_palette_png_with_transparency_keeps_alpha():
    result = process_upload(factories.palette_png_with_transparency())
    part = result.parts[0]
    assert part.mime == "image/png"
    im = open_part(part).convert("RGBA")
    assert im.getpixel((4, 4))[3] == 0  # transparent index stays transparent
    assert im.getpixel((20, 4)) == (255, 0, 0, 255)
    assert im.getpixel((0, 31)) == (0, 0, 255, 255)
    assert_no_metadata(part.data)


def test_exif_orientation_applied_and_gps_stripped():
    raw = factories.exif_rotated_jpeg()
    source = Image.open(io.BytesIO(raw))  # sanity-check the input carries what we strip
    assert source.getexif().get_ifd(0x8825) and "xmp" in source.info and "comment" in source.info

    result = process_upload(raw)
    assert (result.source_width, result.source_height) == (100, 200)
    part = result.parts[0]
    assert (part.width, part.height) == (100, 200)
    im = open_part(part).convert("RGB")
    # The stored top-left marker is displayed top-right after a 90 degree clockwise turn.
    assert close_to(im.getpixel((90, 10)), factories.MARKER, 20)
    assert close_to(im.getpixel((10, 10)), (255, 255, 255), 20)
    assert close_to(im.getpixel((90, 190)), (255, 255, 255), 20)
    assert_no_metadata(part.data)
    assert_no_metadata(result.thumbnail)


def test_icc_profile_is_converted_to_srgb_then_dropped():
    raw = factories.icc_tagged_png()
    assert Image.open(io.BytesIO(raw)).info.get("icc_profile")
    part = process_upload(raw).parts[0]
    # Under the swapped-primaries profile, stored red means blue: proof the pixels were
    # converted, not merely untagged.
    assert close_to(open_part(part).convert("RGB").getpixel((8, 8)), (0, 0, 255), 8)
    assert_no_metadata(part.data)


def test_cmyk_jpeg_with_icc_profile_falls_back_cleanly():
    # An RGB profile on CMYK pixels cannot be applied; the plain conversion must be used.
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    raw = factories.encode(im, "JPEG", icc_profile=factories.swapped_rgb_icc_profile())
    part = process_upload(raw).parts[0]
    assert close_to(open_part(part).convert("RGB").getpixel((8, 8)), (255, 0, 0), 12)
    assert_no_metadata(part.data)


def test_heic_photo_is_accepted():
    # The pillow-heif wheels bundle libheif with the x265 encoder, so HEIC can be generated here.
    raw = factories.encode(factories.photo(640, 480), "HEIF", quality=90)
    assert raw[4:12] == b"ftypheic"
    result = process_upload(raw)
    assert result.source_format == "HEIF"
    assert (result.source_width, result.source_height) == (640, 480)
    part = result.parts[0]
    assert part.mime == "image/jpeg"
    reference = factories.photo(640, 480).getpixel((320, 240))
    assert close_to(open_part(part).convert("RGB").getpixel((320, 240)), reference, 20)
    assert_no_metadata(part.data)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP", "JPEG", "PNG"])
def test_other_accepted_formats(fmt):
    result = process_upload(factories.encode(factories.screenshot(320, 200), fmt))
    assert result.source_format == fmt
    assert result.parts[0].mime in OUTPUT_MIMES
    assert (result.parts[0].width, result.parts[0].height) == (320, 200)


def test_la_and_rgba_images():
    rgba = factories.screenshot(300, 200).convert("RGBA")
    rgba.putalpha(128)
    part = process_upload(factories.encode(rgba, "PNG")).parts[0]
    assert part.mime == "image/png"
    assert open_part(part).mode == "RGBA"
    assert open_part(part).getpixel((5, 100))[3] == 128

    # Fully opaque alpha is dropped so a photo can still become a JPEG.
    opaque = factories.photo(300, 200).convert("RGBA")
    assert process_upload(factories.encode(opaque, "PNG")).parts[0].mime == "image/jpeg"

    la = Image.new("LA", (64, 64), (90, 255))
    la.putpixel((0, 0), (90, 0))
    im = open_part(process_upload(factories.encode(la, "PNG")).parts[0])
    assert im.mode == "LA" and im.getpixel((0, 0))[1] == 0 and im.getpixel((5, 5)) == (90, 255)


# --- sizing ------------------------------------------------------------------------------------


def test_tall_screenshot_is_split_into_ordered_covering_tiles():
    band = 4
    result = process_upload(factories.encode(factories.tall_screenshot(1080, 8000, band), "PNG"))
    assert (result.source_width, result.source_height) == (1080, 8000)
    assert len(result.parts) > 1
    last_band = (8000 - 1) // band
    spans = []
    for part in result.parts:
        assert part.mime == "image/png"
        assert max(part.width, part.height) <= DEFAULT_MAX_EDGE
        assert part.width >= min(MIN_SHORT_SIDE, 1080)  # native width kept, not squashed
        im = open_part(part).convert("RGB")
        first = factories.band_of(im.getpixel((2, 0)))
        last = factories.band_of(im.getpixel((2, part.height - 1)))
        spans.append((first, last))
    assert spans[0][0] == 0 and spans[-1][1] == last_band  # covers top to bottom
    for (_, previous_end), (start, end) in zip(spans, spans[1:], strict=False):
        assert start < end
        assert start <= previous_end  # ordered, overlapping: no row is lost between tiles
    thumb = Image.open(io.BytesIO(result.thumbnail))
    assert max(thumb.size) <= 256


def test_extremely_tall_image_is_capped_in_tile_count():
    result = process_upload(factories.encode(factories.screenshot(600, 40_000), "PNG"), max_tiles=4)
    assert len(result.parts) == 4
    assert all(max(p.width, p.height) <= DEFAULT_MAX_EDGE for p in result.parts)


def test_large_photo_becomes_jpeg_within_max_edge():
    result = process_upload(factories.encode(factories.photo(4000, 3000), "JPEG", quality=95))
    assert len(result.parts) == 1
    part = result.parts[0]
    assert part.mime == "image/jpeg"
    assert (part.width, part.height) == (DEFAULT_MAX_EDGE, 2250)  # as large as allowed
    assert len(part.data) <= images.DEFAULT_MAX_OUTPUT_BYTES
    assert_no_metadata(part.data)


def test_small_screenshot_stays_png_at_its_own_size():
    shot = factories.screenshot(800, 600)
    result = process_upload(factories.encode(shot, "PNG"))
    part = result.parts[0]
    assert part.mime == "image/png"
    assert (part.width, part.height) == (800, 600)  # never upscaled
    decoded = open_part(part).convert("RGB")
    assert ImageChops.difference(decoded, shot).getbbox() is None  # lossless


def test_max_edge_fits_long_edge_when_short_side_stays_legible():
    result = process_upload(
        factories.encode(factories.screenshot(2400, 1600), "PNG"), max_edge=1800
    )
    assert [(p.width, p.height) for p in result.parts] == [(1800, 1200)]


# --- byte budget -------------------------------------------------------------------------------


def _busy_screenshot(alpha: int | None = None) -> bytes:
    im = factories.screenshot(1200, 900)
    im.paste(factories.noise(300, 900), (900, 0))  # still mostly flat, but PNG gets big
    if alpha is not None:
        im = im.convert("RGBA")
        im.putalpha(alpha)
    return factories.encode(im, "PNG")


def test_over_budget_png_falls_back_to_jpeg():
    raw = _busy_screenshot()
    lossless = process_upload(raw).parts[0]
    assert lossless.mime == "image/png"
    budget = len(lossless.data) // 2
    part = process_upload(raw, max_output_bytes=budget).parts[0]
    assert part.mime == "image/jpeg"
    assert len(part.data) <= budget
    assert (part.width, part.height) == (1200, 900)  # quality goes down before size does


def test_over_budget_transparent_png_falls_back_to_webp_keeping_alpha():
    raw = _busy_screenshot(alpha=128)
    budget = len(process_upload(raw).parts[0].data) // 2
    part = process_upload(raw, max_output_bytes=budget).parts[0]
    assert part.mime == "image/webp"
    assert len(part.data) <= budget
    assert open_part(part).convert("RGBA").getpixel((5, 450))[3] == 128


def test_tiny_budget_shrinks_dimensions():
    part = process_upload(
        factories.encode(factories.photo(1600, 1200), "JPEG"), max_output_bytes=40_000
    ).parts[0]
    assert part.mime == "image/jpeg"
    assert len(part.data) <= 40_000
    assert part.width < 1600 and part.width / part.height == pytest.approx(4 / 3, rel=0.01)


def test_impossible_budget_is_an_image_error():
    with pytest.raises(ImageError, match="could not be compressed"):
        process_upload(factories.encode(factories.noise(200, 200), "PNG"), max_output_bytes=10)


# --- determinism and helpers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: factories.encode(factories.photo(1200, 900), "JPEG"),
        lambda: factories.encode(factories.screenshot(900, 700), "PNG"),
        factories.exif_rotated_jpeg,
        lambda: _busy_screenshot(alpha=200),
    ],
    ids=["photo", "screenshot", "exif-jpeg", "transparent"],
)
def test_same_input_gives_identical_bytes(make):
    raw = make()
    first, second = process_upload(raw), process_upload(bytes(raw))
    assert first == second
    assert [p.data for p in first.parts] == [p.data for p in second.parts]
    assert first.thumbnail == second.thumbnail


def test_thumbnail_is_small_and_clean():
    result = process_upload(factories.encode(factories.photo(1600, 1200), "JPEG"))
    assert result.thumbnail_mime == "image/webp"
    thumb = Image.open(io.BytesIO(result.thumbnail))
    assert thumb.format == "WEBP" and thumb.size == (256, 192)
    assert_no_metadata(result.thumbnail)


def test_data_url():
    payload = b"\x89PNG\r\n\x1a\nabc"
    url = data_url(payload, "image/png")
    assert url == "data:image/png;base64," + base64.b64encode(payload).decode()
    assert base64.b64decode(url.split(",", 1)[1]) == payload
    assert data_url(payload, "image/png") == url
    with pytest.raises(ValueError):
        data_url(payload, "text/html")


def test_sha256_hex():
    assert sha256_hex(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(sha256_hex(b"")) == 64


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_a_jpeg_source_is_never_inflated_to_png():
    # Flat colours would read as a screenshot, but a JPEG's pixels are already lossy: PNG would
    # only add bytes.
    flat = Image.new("RGB", (1200, 800), (40, 90, 200))
    buffer = io.BytesIO()
    flat.save(buffer, "JPEG", quality=95)
    result = process_upload(buffer.getvalue())
    assert [part.mime for part in result.parts] == ["image/jpeg"]
