"""Image pipeline figures: chatapp.images.process_upload on generated inputs, on one core.

`python -m bench.images` pins itself to one CPU, generates a 4032x3024 JPEG photo, a 3840x2160
PNG screenshot, a 1080x8000 scrolling screenshot and a 12-megapixel HEIC (nothing downloaded),
runs each through the pipeline a few times and prints one JSON list: input bytes, the median
and best milliseconds, output bytes (all parts) and the parts' sizes.
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
    print(json.dumps(results))


if __name__ == "__main__":
    main()
