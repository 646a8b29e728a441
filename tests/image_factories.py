"""Generate test images in memory (nothing is downloaded or stored in the repository)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from PIL import ExifTags, Image, ImageDraw, ImageFilter

MARKER = (255, 0, 0)


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **options)
    return buffer.getvalue()


def screenshot(width: int, height: int) -> Image.Image:
    """Flat UI-like image: a header bar, panels and rows of dark 'text' strokes."""
    im = Image.new("RGB", (width, height), (246, 247, 249))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, width, 40), fill=(32, 90, 200))
    draw.rectangle((0, 40, min(200, width // 4), height), fill=(230, 232, 236))
    for y in range(60, height - 20, 22):
        for x in range(min(220, width // 4 + 20), width - 60, 90):
            draw.rectangle((x, y, x + 60 + (x * 7 + y) % 25, y + 11), fill=(20, 20, 24))
    return im


def photo(width: int, height: int, *, seed_sigma: float = 24) -> Image.Image:
    """Photo-like: smooth colour gradients plus blurred sensor-style noise (no flat areas)."""
    red = Image.linear_gradient("L").resize((width, height))
    green = Image.radial_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), seed_sigma)
    blue = Image.blend(red.transpose(Image.Transpose.ROTATE_90).resize((width, height)), noise, 0.5)
    im = Image.merge("RGB", (Image.blend(red, noise, 0.3), Image.blend(green, noise, 0.3), blue))
    return im.filter(ImageFilter.GaussianBlur(0.6))


def noise(width: int, height: int) -> Image.Image:
    """Incompressible RGB noise, the worst case for every encoder."""
    channels = [Image.effect_noise((width, height), 90) for _ in range(3)]
    return Image.merge("RGB", channels)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of any size, built row by row so memory stays tiny.

    All-zero rows deflate ~1000:1, so even 30,000 x 30,000 is ~110 KB; building it never holds
    more than one row in memory.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey, no interlace
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("picture.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    return buffer.getvalue()


SVG_WITH_SCRIPT = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
    b'<script>alert(document.cookie)</script><rect width="100" height="100" fill="red"/></svg>'
)


def animated_gif() -> bytes:
    """Three frames: red, green, blue. Only the first (red) may be used."""
    frames = [Image.new("RGB", (40, 30), colour) for colour in (MARKER, (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def cmyk_jpeg() -> bytes:
    """Left half pure cyan ink+yellow ink (= green), right half magenta+yellow (= red)."""
    im = Image.new("CMYK", (64, 32), (255, 0, 255, 0))
    im.paste((0, 255, 255, 0), (32, 0, 64, 32))
    return encode(im, "JPEG", quality=95)


def grey16_png(value: int = 0x8080) -> bytes:
    return encode(Image.new("I;16", (32, 32), value), "PNG")


def palette_png_with_transparency() -> bytes:
    im = Image.new("P", (32, 32), 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 - 3) * 3)
    ImageDraw.Draw(im).rectangle((16, 0, 31, 31), fill=1)  # right half red
    im.putpixel((0, 31), 2)  # one blue pixel
    return encode(im, "PNG", transparency=0)  # left half (index 0) fully transparent


def exif_rotated_jpeg() -> bytes:
    """Stored 200x100 with a red block at the stored top-left, orientation 6, GPS and XMP.

    Orientation 6 means "rotate 90 degrees clockwise to display": the displayed image is 100x200
    and the stored top-left corner appears at the top-right.
    """
    im = Image.new("RGB", (200, 100), (255, 255, 255))
    im.paste(MARKER, (0, 0, 30, 30))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "TestCam"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 1.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 2.0)
    xmp = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF/></x:xmpmeta>"
    return encode(im, "JPEG", quality=95, exif=exif, xmp=xmp, comment=b"secret comment")


def _s15f16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def swapped_rgb_icc_profile() -> bytes:
    """A minimal ICC v2 RGB matrix/TRC profile whose red and blue primaries are swapped.

    Under this profile the stored value (255, 0, 0) *means* sRGB blue, so a correct conversion
    to sRGB must turn it blue; dropping the profile without converting would leave it red.
    """
    d50 = (0.9642, 1.0, 0.8249)
    srgb_red, srgb_green, srgb_blue = (
        (0.4361, 0.2225, 0.0139),
        (0.3851, 0.7169, 0.0971),
        (0.1431, 0.0606, 0.7141),
    )

    def xyz(values: tuple[float, float, float]) -> bytes:
        return b"XYZ " + bytes(4) + b"".join(_s15f16(v) for v in values)

    text = b"swapped primaries\x00"
    desc = (
        b"desc"
        + bytes(4)
        + struct.pack(">I", len(text))
        + text
        + bytes(8)  # Unicode language code and count
        + bytes(3)
        + bytes(67)  # ScriptCode code, count and buffer
    )
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, 0x0233) + bytes(2)  # gamma 2.2
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(d50)),
        (b"rXYZ", xyz(srgb_blue)),
        (b"gXYZ", xyz(srgb_green)),
        (b"bXYZ", xyz(srgb_red)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text" + bytes(4) + b"public domain\x00\x00\x00"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + bytes(4)
        + bytes((2, 0x10, 0, 0))
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + bytes(4)
        + bytes(4)
        + bytes(8)
        + bytes(8)
        + bytes(4)
        + b"".join(_s15f16(v) for v in d50)
        + bytes(4)
        + bytes(16)
        + bytes(28)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def icc_tagged_png() -> bytes:
    return encode(Image.new("RGB", (16, 16), MARKER), "PNG", icc_profile=swapped_rgb_icc_profile())


def tall_screenshot(width: int = 1080, height: int = 8000, band: int = 4) -> Image.Image:
    """A scrolling capture whose left 8 px column encodes the row band, for checking tiles.

    Band ``b`` (rows ``b*band .. b*band+band-1``) has left-column colour ``band_colour(b)``.
    """
    im = screenshot(width, height)
    draw = ImageDraw.Draw(im)
    for b in range(math_ceil(height, band)):
        draw.rectangle((0, b * band, 7, b * band + band - 1), fill=band_colour(b))
    return im


def band_colour(b: int) -> tuple[int, int, int]:
    return (b % 256, (b // 256) * 16, 77)


def band_of(colour: tuple[int, int, int]) -> int:
    return colour[0] + (colour[1] // 16) * 256


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)
