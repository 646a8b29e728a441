"""Image pipeline figures: chatapp.images.process_upload on generated inputs, on one core.

`python -m bench.images` pins itself to one CPU, generates a 4032x3024 JPEG photo, a 3840x2160
PNG screenshot, a 1080x8000 scrolling screenshot and a 12-megapixel HEIC (nothing downloaded),
runs each through the pipeline a few times and prints one JSON list: input bytes, the median
and best milliseconds, output bytes (all parts) and the parts' sizes. The same figures for the
other media: one page of a vector PDF (text and a diagram, written here) rendered at 200 dpi and
prepared as an image (chatapp.pdfs), the page picker's preview of a 20-page PDF, and a 20-second
1440x900 screen recording normalised (video + key frames, chatapp.videos).
"""

import io
import json
import os
import random
import statistics
import time

from PIL import Image, ImageDraw, ImageFilter

RUNS = 3


def photo(width: int, height: int, seed: int = 1) -> Image.Image:
    """Smooth scene-like colour fields plus sensor noise: compresses like a camera photo."""
    rng = random.Random(seed)
    small = Image.new("RGB", (16, 12))
    small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(16 * 12)])
    base = small.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(60):  # edges and objects, so it is not one gradient
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(40, width // 6)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    base = base.filter(ImageFilter.GaussianBlur(3))
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    return Image.blend(base, noise, 0.12)


def screenshot(width: int, height: int, seed: int = 2) -> Image.Image:
    """Flat UI panels with many lines of small text: what a screenshot of an app looks like."""
    rng = random.Random(seed)
    im = Image.new("RGB", (width, height), (250, 250, 252))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, width, 48), fill=(32, 36, 48))
    draw.rectangle((0, 48, min(300, width // 4), height), fill=(238, 240, 245))
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "error",
        "build",
        "test",
        "deploy",
        "value",
    ]
    left = min(300, width // 4) + 24
    for y in range(64, height - 20, 22):
        line = " ".join(rng.choice(words) for _ in range(rng.randrange(4, 30)))
        draw.text((left, y), line, fill=(20, 20, 20))
        if rng.random() < 0.05:
            draw.rectangle((left, y, left + 180, y + 18), fill=(60, 120, 220))
    return im


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def inputs() -> list[tuple[str, bytes]]:
    import pillow_heif

    pillow_heif.register_heif_opener()
    return [
        ("photo 4032x3024 JPEG", encode(photo(4032, 3024), "JPEG", quality=92)),
        ("screenshot 3840x2160 PNG", encode(screenshot(3840, 2160), "PNG")),
        ("scrolling screenshot 1080x8000 PNG", encode(screenshot(1080, 8000, seed=3), "PNG")),
        ("photo 4000x3000 (12 MP) HEIC", encode(photo(4000, 3000, seed=4), "HEIF", quality=80)),
    ]


def vector_pdf(pages: int, seed: int = 5) -> bytes:
    """A Letter-size PDF whose pages carry ~60 lines of Helvetica text and a boxes-and-arrows
    diagram, as vector operators (what a diagram or a spec exported to PDF looks like)."""
    rng = random.Random(seed)
    words = ["queue", "worker", "retry", "client", "cache", "store", "deploy", "timeout", "token"]
    streams = []
    for _ in range(pages):
        ops = ["0.1 0.1 0.1 rg", "BT /F1 9 Tf 54 740 Td 11 TL"]
        for _ in range(30):
            line = " ".join(rng.choice(words) for _ in range(rng.randrange(6, 14)))
            ops.append(f"({line}) Tj T*")
        ops.append("ET")
        for _ in range(12):
            x, y = rng.randrange(54, 480), rng.randrange(60, 380)
            ops.append(f"0.2 0.4 0.85 RG 1.5 w {x} {y} 90 40 re S")
            ops.append(f"BT /F1 8 Tf {x + 6} {y + 16} Td ({rng.choice(words)}) Tj ET")
            ops.append(f"{x + 90} {y + 20} m {x + 130} {y + rng.randrange(-40, 40)} l S")
        streams.append("\n".join(ops).encode())
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    page_ids = [4 + 2 * i for i in range(pages)]
    kids = " ".join(f"{n} 0 R" for n in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for index, stream in enumerate(streams):
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << "
            f"/F1 3 0 R >> >> /Contents {page_ids[index] + 1} 0 R >>".encode()
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    out.write(b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets))
    trailer = f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    out.write(trailer.encode())
    return out.getvalue()


def timed(function, runs: int = RUNS):
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = function()
        times.append((time.perf_counter() - start) * 1000)
    return out, statistics.median(times), min(times)


def media_results() -> list[dict]:
    from chatapp.pdfs import pdf_preview, pdf_render_pages
    from chatapp.videos import process_video

    results = []
    document = vector_pdf(20)
    rendered, median, best = timed(lambda: pdf_render_pages(document, [3]))
    parts = rendered[0].processed.parts
    results.append(
        {
            "image": "PDF page (Letter, vector text + diagram) at 200 dpi",
            "input_bytes": len(document),
            "ms_median": median,
            "ms_best": best,
            "output_bytes": sum(len(p.data) for p in parts),
            "parts": len(parts),
            "part_mimes": sorted({p.mime for p in parts}),
        }
    )
    preview, median, best = timed(lambda: pdf_preview(document))
    results.append(
        {
            "image": "PDF preview: 20 pages, thumbnails",
            "input_bytes": len(document),
            "ms_median": median,
            "ms_best": best,
            "output_bytes": sum(len(p.thumbnail or b"") for p in preview.pages),
            "parts": len(preview.pages),
            "part_mimes": ["image/webp"],
        }
    )
    clip = screen_recording(20)
    processed, median, best = timed(lambda: process_video(clip, max_upload_bytes=10**9), runs=1)
    results.append(
        {
            "image": "screen recording 20 s 1440x900 MP4 -> video + key frames",
            "input_bytes": len(clip),
            "ms_median": median,
            "ms_best": best,
            "output_bytes": len(processed.video),
            "parts": len(processed.frames),
            "part_mimes": ["video/mp4"],
        }
    )
    return results


def screen_recording(seconds: int, fps: int = 30, size=(1440, 900)) -> bytes:
    """A screen-recording-like clip: a screenshot scrolled a little every frame, a new window
    every 4 seconds, encoded with libx264 as a screen recorder would."""
    import av

    pages = [screenshot(size[0], size[1] * 2, seed=seed) for seed in range(seconds // 4 + 1)]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for index in range(seconds * fps):
            page = pages[index // (4 * fps)]
            top = (index % (4 * fps)) * 4
            frame = av.VideoFrame.from_image(page.crop((0, top, size[0], top + size[1])))
            frame.pts = index
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})  # one core, as the target says
    from chatapp.images import process_upload

    results = []
    for name, data in inputs():
        times = []
        for _ in range(RUNS):
            start = time.perf_counter()
            out = process_upload(data)
            times.append((time.perf_counter() - start) * 1000)
        parts = [len(p.data) for p in out.parts]
        results.append(
            {
                "image": name,
                "input_bytes": len(data),
                "ms_median": statistics.median(times),
                "ms_best": min(times),
                "output_bytes": sum(parts),
                "parts": len(parts),
                "part_mimes": sorted({p.mime for p in out.parts}),
                "thumbnail_bytes": len(out.thumbnail),
            }
        )
    results += media_results()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
