"""PDFs and videos made in the tests (no fixture files): exact, small, and deterministic."""

import io

from PIL import Image, ImageDraw

PAGE_COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 160, 20)]


def minimal_pdf(pages: int, *, encrypt: bool = False, size=(612, 792)) -> bytes:
    """A valid PDF of `pages` empty pages, written by hand (2,000 pages in a few milliseconds).
    `encrypt` adds a Standard security handler whose password is not empty."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    for _ in range(pages):
        box = f"[0 0 {size[0]} {size[1]}]"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox {box} >>".encode())
    trailer_extra = b""
    if encrypt:
        objects.append(
            b"<< /Filter /Standard /V 1 /R 2 /O <"
            + b"ab" * 32
            + b"> /U <"
            + b"cd" * 32
            + b"> /P -4 >>"
        )
        ids = "00" * 16
        trailer_extra = f" /Encrypt {len(objects)} 0 R /ID [<{ids}> <{ids}>]".encode()
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R".encode() + trailer_extra)
    out.write(f" >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def coloured_pdf(pages: int = 3, *, inches=(8.5, 11)) -> bytes:
    """A PDF whose page N is filled with PAGE_COLOURS[N-1] and has a white band at the top, so a
    test can tell which page an image came from."""
    dpi = 50
    size = (round(inches[0] * dpi), round(inches[1] * dpi))
    frames = []
    for index in range(pages):
        image = Image.new("RGB", size, PAGE_COLOURS[index % len(PAGE_COLOURS)])
        ImageDraw.Draw(image).rectangle((0, 0, size[0], size[1] // 10), fill=(255, 255, 255))
        frames.append(image)
    buffer = io.BytesIO()
    frames[0].save(buffer, "PDF", save_all=True, append_images=frames[1:], resolution=dpi)
    return buffer.getvalue()


SCENE_COLOURS = [(200, 40, 40), (40, 160, 60), (40, 80, 220), (230, 160, 20), (120, 40, 160)]


def screen_recording(
    seconds: float = 5,
    *,
    fps: int = 15,
    size=(640, 400),
    container: str = "mp4",
    scene_every: float = 1.0,
    audio: bool = False,
) -> bytes:
    """A clip made with PyAV: a solid "window" that changes colour every `scene_every` seconds
    (a new scene) with a small white "cursor" moving across it; optionally a sine audio track."""
    import math

    import av

    codec = {"mp4": "libx264", "mov": "libx264", "webm": "libvpx-vp9"}[container]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        else:
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        sound = None
        if audio:
            sound = output.add_stream("aac" if container != "webm" else "libopus", rate=48000)
        frames = round(seconds * fps)
        for index in range(frames):
            scene = int(index / fps / scene_every)
            image = Image.new("RGB", size, SCENE_COLOURS[scene % len(SCENE_COLOURS)])
            x = index * 4 % (size[0] - 20)
            ImageDraw.Draw(image).rectangle((x, 40, x + 12, 52), fill=(255, 255, 255))
            frame = av.VideoFrame.from_image(image)
            frame.pts = index
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
        if sound is not None:
            import array

            samples = 1024
            for block in range(int(seconds * 48000 / samples)):
                wave = array.array(
                    "f",
                    [
                        0.2 * math.sin(2 * math.pi * 440 * (block * samples + i) / 48000)
                        for i in range(samples)
                    ],
                )
                audio_frame = av.AudioFrame(format="flt", layout="mono", samples=samples)
                audio_frame.planes[0].update(wave.tobytes())
                audio_frame.sample_rate = 48000
                audio_frame.pts = block * samples
                for packet in sound.encode(audio_frame):
                    output.mux(packet)
            for packet in sound.encode():
                output.mux(packet)
    return buffer.getvalue()
