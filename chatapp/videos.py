"""Screen recordings: probe, trim, scale and re-encode a short video with PyAV (FFmpeg), and
pick its key frames for models that take no video.

Contract (pure, synchronous; the upload view runs it in the image worker pool, never on the
event loop):

* ``is_video(data)`` recognises MP4 / MOV (ISO base media) and WebM / Matroska from the bytes.
* ``process_video(data, ...)`` decodes the first video track once, up to ``max_seconds`` (longer
  recordings are trimmed, not refused), and produces both forms a model may get:
  - ``video``: H.264 in MP4, no audio track, at most ``fps`` frames a second, the longest edge
    at most ``max_edge`` (even dimensions), within ``max_output_bytes``: the shape Moonshot's
    ``video_url`` content part takes as a data URL;
  - ``frames``: up to ``max_frames`` key frames chosen at scene changes (the first frame always,
    then the frames that differ most from the one before them), each run through the image
    pipeline at full resolution, with its timestamp.
  Audio is always dropped: no model in the catalog takes audio input.
* Every refusal is a :class:`VideoError` whose ``str()`` is a user-facing reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import tempfile
from dataclasses import dataclass, field

from PIL import Image, ImageChops, ImageStat

from . import images

log = logging.getLogger(__name__)

ACCEPTED_TYPES_TEXT = "MP4, MOV or WebM"
# FFmpeg's demuxer names for the accepted containers.
_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4", "matroska,webm": "WebM"}
DEFAULT_MAX_SECONDS = 60
DEFAULT_FPS = 10
# 1280 px: UI text of a 1440p/1600p screen capture stays readable at ~0.5-0.9 scale, and one
# minute at 10 fps stays a few MB. Frames sent as images keep the full resolution instead.
DEFAULT_MAX_EDGE = 1280
DEFAULT_MAX_OUTPUT_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_FRAMES = 8
DEFAULT_MAX_PIXELS = 4096 * 4096
# Mean absolute difference (0-255) of two 64 px wide grey thumbnails above which the picture is
# taken to have changed: a new window, a dialog, a page scrolled by a screen. A moving cursor
# or a blinking caret stays far below it.
SCENE_THRESHOLD = 6.0
_PROBE = (64, 40)
# Encoder settings, best first: a re-encode that is over the byte budget tries the next one.
_LADDER = (
    {"crf": "28", "scale": 1.0},
    {"crf": "34", "scale": 1.0},
    {"crf": "34", "scale": 0.75},
    {"crf": "38", "scale": 0.5},
)


class VideoError(images.ImageError):
    """A user-facing reason a recording was refused."""


@dataclass(frozen=True, slots=True)
class KeyFrame:
    seconds: float
    processed: images.ProcessedUpload


@dataclass(slots=True)
class ProcessedVideo:
    video: bytes  # MP4 (H.264, yuv420p, no audio)
    width: int
    height: int
    seconds: float  # of the video sent (after trimming)
    source_seconds: float  # of the upload
    source_width: int
    source_height: int
    source_format: str  # "MP4" or "WebM"
    fps: float
    thumbnail: bytes  # WebP, at most images.THUMBNAIL_EDGE
    frames: list[KeyFrame] = field(default_factory=list)


def is_video(data: bytes) -> bool:
    head = data[:64]
    # ISO base media (MP4, MOV, 3GP): a box size then "ftyp" (or an old QuickTime "moov"/"mdat").
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return True
    return head[:4] == b"\x1a\x45\xdf\xa3"  # EBML: Matroska / WebM


def _open(data: bytes, max_pixels: int):
    import av  # on first use: PyAV and its FFmpeg libraries add ~18 MB to a process

    unreadable = VideoError(
        f"The recording could not be read; it may be truncated or corrupt. Please attach a "
        f"complete {ACCEPTED_TYPES_TEXT} file."
    )
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError):
        raise unreadable from None
    fmt = _FORMATS.get(container.format.name)
    if fmt is None:
        container.close()
        raise VideoError(f"This recording's format is not supported; attach {ACCEPTED_TYPES_TEXT}.")
    if not container.streams.video:
        container.close()
        raise VideoError("The file has no video track.")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        container.close()
        raise unreadable
    if width * height > max_pixels:
        container.close()
        raise VideoError(
            f"The recording is too large: {width}×{height} pixels; the limit is "
            f"{max_pixels / 1_000_000:g} megapixels a frame."
        )
    return container, stream, fmt


def _duration(container, stream) -> float:
    import av

    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


def _even(n: float) -> int:
    return max(2, int(round(n / 2)) * 2)


def _probe(image: Image.Image) -> Image.Image:
    return image.convert("L").resize(_PROBE, Image.Resampling.BILINEAR)


def _difference(a: Image.Image, b: Image.Image) -> float:
    return ImageStat.Stat(ImageChops.difference(a, b)).mean[0]


class _Encoder:
    """H.264 in MP4, fed one frame at a time (nothing but the output is kept). Written to a
    temporary file because "faststart" (the index before the media, so the length and size can
    be read from the first kilobytes: context_window does) rewrites the file at the end."""

    def __init__(self, *, fps: float, width: int, height: int, crf: str) -> None:
        import av

        self.directory = tempfile.TemporaryDirectory(prefix="kimichat-video-")
        self.path = os.path.join(self.directory.name, "out.mp4")
        self.size = (width, height)
        self.output = av.open(self.path, mode="w", format="mp4", options={"movflags": "faststart"})
        self.stream = self.output.add_stream("libx264", rate=int(round(fps)))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        # veryfast: a fraction of the default preset's CPU for a few % more bytes. One thread:
        # the worker pool is the parallelism, and the event loop's core stays free.
        self.stream.options = {"crf": crf, "preset": "veryfast", "threads": "1"}
        self.count = 0

    def add(self, image: Image.Image) -> None:
        import av

        if image.size != self.size:
            image = image.resize(self.size, Image.Resampling.BILINEAR)
        frame = av.VideoFrame.from_image(image)
        frame.pts = self.count
        self.count += 1
        for packet in self.stream.encode(frame):
            self.output.mux(packet)

    def finish(self) -> bytes:
        try:
            for packet in self.stream.encode():
                self.output.mux(packet)
            self.output.close()
            with open(self.path, "rb") as handle:
                return handle.read()
        finally:
            self.directory.cleanup()

    def abandon(self) -> None:
        import av

        with contextlib.suppress(av.FFmpegError):
            self.output.close()
        self.directory.cleanup()


def _pass(data: bytes, *, max_seconds, fps, max_pixels, max_edge, rung, max_frames):
    """Decode once up to max_seconds at `fps`, encoding as it goes; collects the key frames
    (at most max_frames + 1 full frames are ever held). -> (format, source seconds, source
    size, sent seconds, mp4 bytes, (width, height), key frames)."""
    import av

    container, stream, fmt = _open(data, max_pixels)
    stream.thread_type = "AUTO"
    source_seconds = _duration(container, stream)
    encoder = None
    # Key frames: (seconds, image, score); the first frame always, then changes of scene.
    keys: list[tuple[float, Image.Image, float]] = []
    last_probe = None
    last: tuple[float, Image.Image] | None = None
    next_time = 0.0
    step = 1.0 / fps
    source_size = (stream.codec_context.width, stream.codec_context.height)
    try:
        for frame in container.decode(stream):
            seconds = float(frame.time) if frame.time is not None else next_time
            if seconds >= max_seconds:
                break
            if seconds + 1e-6 < next_time:
                continue
            next_time = max(next_time + step, seconds + step / 2)
            image = frame.to_image()  # RGB, at the source size
            if encoder is None:
                source_size = image.size
                scale = min(1.0, max_edge / max(image.size)) * rung["scale"]
                size = (_even(image.width * scale), _even(image.height * scale))
                encoder = _Encoder(fps=fps, width=size[0], height=size[1], crf=rung["crf"])
            encoder.add(image)
            last = (seconds, image)
            if max_frames:
                probe = _probe(image)
                score = float("inf") if last_probe is None else _difference(probe, last_probe)
                if score >= SCENE_THRESHOLD:
                    keys.append((seconds, image, score))
                    last_probe = probe
                    if len(keys) > max_frames:
                        # Drop the least different key frame (never the first).
                        weakest = min(range(1, len(keys)), key=lambda i: keys[i][2])
                        del keys[weakest]
    except av.FFmpegError:
        if last is None:
            if encoder is not None:
                encoder.abandon()
            raise VideoError(
                "The recording could not be decoded; it may be truncated or corrupt."
            ) from None
        log.info("video decode stopped early at %.2f s (damaged tail)", last[0])
    except BaseException:
        if encoder is not None:
            encoder.abandon()
        raise
    finally:
        container.close()
    if encoder is None or last is None:
        raise VideoError("The recording has no frames.")
    if max_frames > 1 and len(keys) == 1 and last[0] > keys[0][0]:
        # No change of scene at all: the end state is worth seeing too.
        keys.append((last[0], last[1], 0.0))
    sent_seconds = min(max_seconds, last[0] + step)
    if source_seconds:
        sent_seconds = min(sent_seconds, source_seconds)
    video = encoder.finish()
    return fmt, source_seconds, source_size, sent_seconds, video, encoder.size, keys


def process_video(
    data: bytes,
    *,
    max_upload_bytes: int,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    fps: float = DEFAULT_FPS,
    max_edge: int = DEFAULT_MAX_EDGE,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_max_edge: int = images.DEFAULT_MAX_EDGE,
    image_max_output_bytes: int = images.DEFAULT_MAX_OUTPUT_BYTES,
    image_max_tiles: int = images.DEFAULT_MAX_TILES,
) -> ProcessedVideo:
    if not data:
        raise VideoError("The file is empty.")
    if len(data) > max_upload_bytes:
        raise VideoError(
            f"The recording is too large ({len(data) / 1048576:.1f} MB); the limit is "
            f"{max_upload_bytes / 1048576:.0f} MB."
        )
    keys: list = []
    for index, rung in enumerate(_LADDER):
        # Key frames come from the first pass; a re-encode for the byte budget only encodes.
        fmt, source_seconds, source_size, seconds, video, size, found = _pass(
            data,
            max_seconds=max_seconds,
            fps=fps,
            max_pixels=max_pixels,
            max_edge=max_edge,
            rung=rung,
            max_frames=max_frames if index == 0 else 0,
        )
        keys = keys or found
        if len(video) <= max_output_bytes:
            break
    else:
        raise VideoError(
            f"The recording could not be compressed below {max_output_bytes / 1048576:.0f} MB; "
            f"attach a shorter one (at most {max_seconds:g} seconds are sent)."
        )
    frames = [
        KeyFrame(
            round(seconds_at, 2),
            images.process_image(
                image,
                source_format="VIDEO",
                max_edge=image_max_edge,
                max_output_bytes=image_max_output_bytes,
                max_tiles=image_max_tiles,
            ),
        )
        for seconds_at, image, _ in keys
    ]
    first = keys[0][1].copy()
    first.thumbnail((images.THUMBNAIL_EDGE, images.THUMBNAIL_EDGE))
    thumb = io.BytesIO()
    first.save(thumb, "WEBP", quality=80, method=4)
    return ProcessedVideo(
        video=video,
        width=size[0],
        height=size[1],
        seconds=round(seconds, 2),
        source_seconds=round(source_seconds, 2),
        source_width=source_size[0],
        source_height=source_size[1],
        source_format=fmt,
        fps=fps,
        thumbnail=thumb.getvalue(),
        frames=frames,
    )


def timestamp(seconds: float) -> str:
    """0:07.5 / 1:02.0"""
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}:{rest:04.1f}"


def mp4_summary(head: bytes) -> tuple[float, int, int] | None:
    """(seconds, width, height) from the start of a "faststart" MP4 (its moov box), or None.
    Reads box headers only: cheap enough for the event loop."""

    def boxes(data: bytes, start: int, end: int):
        while start + 8 <= end:
            size, kind = struct.unpack(">I4s", data[start : start + 8])
            header = 8
            if size == 1 and start + 16 <= end:
                size, header = struct.unpack(">Q", data[start + 8 : start + 16])[0], 16
            if size < header:
                return
            yield kind, start + header, min(start + size, end)
            start += size

    seconds = width = height = None
    for kind, body, end in boxes(head, 0, len(head)):
        if kind != b"moov":
            continue
        for inner, ibody, iend in boxes(head, body, end):
            if inner == b"mvhd" and iend - ibody >= 32:
                if head[ibody] == 1:
                    timescale, duration = struct.unpack(">IQ", head[ibody + 20 : ibody + 32])
                else:
                    timescale, duration = struct.unpack(">II", head[ibody + 12 : ibody + 20])
                seconds = duration / timescale if timescale else None
            elif inner == b"trak" and width is None:
                for leaf, lbody, lend in boxes(head, ibody, iend):
                    if leaf == b"tkhd" and lend - lbody >= 84:
                        offset = lbody + (88 if head[lbody] == 1 else 76)
                        w, h = struct.unpack(">II", head[offset : offset + 8])
                        if w and h:
                            width, height = w >> 16, h >> 16
    if seconds is None or not width or not height:
        return None
    return seconds, width, height
