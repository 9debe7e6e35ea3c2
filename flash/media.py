"""Loading user media (images and videos) into RGB PIL frames.

:func:`load_media` is the one entry point: it sniffs the file's first bytes, opens images with
Pillow and videos with PyAV, and returns a :class:`Media` holding RGB frames in order. Every
failure a user can cause (missing, empty, huge, corrupt, audio-only, unknown format) becomes a
:class:`MediaError` carrying one sentence that says what is wrong and what to do, so the app can
show it as is.

Videos are sampled at ``num_frames`` evenly spaced times, each frame being the one on screen at
that time. Long videos are sampled by seeking to the keyframe before each time, so a 20-minute
file costs a few GOPs of decoding rather than every frame.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import av
import av.error
import numpy as np
from av.container import InputContainer
from av.video.stream import VideoStream
from PIL import Image, ImageOps

__all__ = ["Media", "MediaError", "MediaLimits", "browser_playable", "browser_preview", "is_video_path", "load_media"]

_log = logging.getLogger(__name__)

T = TypeVar("T")
# (seconds from the stream start, frame), in presentation order.
TimedFrames = Iterator[tuple[float, av.VideoFrame]]

# Pillow decoders we accept; naming them keeps Pillow from trying its rarer, less-hardened plugins.
# JPEG covers MPO (the multi-picture JPEG of some cameras); AVIF only where Pillow has it.
Image.init()
IMAGE_FORMATS = tuple(
    name for name in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if name in Image.OPEN
)
# Formats whose multi-frame files are animations (multi-page TIFF and MPO pairs are not).
ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".3gp",
     ".ogv", ".flv", ".wmv", ".asf"}
)
SUPPORTED_HINT = (
    "use a JPEG, PNG, WebP, GIF, BMP or TIFF image, or an MP4, WebM, MOV, MKV or AVI video"
)
# Videos with at most this many frames are decoded start to end: seeking would cost more.
SEQUENTIAL_MAX_FRAMES = 300
# A GIF frame with no (or zero) delay is shown for 100 ms by browsers; count it the same.
GIF_DEFAULT_FRAME_S = 0.1

# Enough for every magic number below, including the second MPEG-TS sync byte at 188.
_SNIFF_BYTES = 512
# ISO-BMFF brands that are still images or audio, not video.
_IMAGE_BRANDS = frozenset({"avif", "avis", "heic", "heix", "heim", "heis", "hevc", "hevx", "mif1",
                           "msf1"})
_AUDIO_BRANDS = frozenset({"M4A ", "M4B ", "M4P ", "F4A ", "F4B "})


class MediaError(ValueError):
    """One clear sentence for the user, saying what is wrong and what to do."""


@dataclass(frozen=True)
class Media:
    """A loaded image (one frame) or video (frames sampled in time order), all RGB."""

    kind: Literal["image", "video"]
    frames: tuple[Image.Image, ...]
    source: str  # file name, for display
    size: tuple[int, int]  # (width, height) of the original, as displayed
    duration_s: float | None = None  # videos (animated GIFs too)
    # Known ImageNet classes as (index, probability), most likely first: a training corpus's labels. The
    # embedded models ground their prompt on these instead of their classifier's guess (``python -m
    # flash train --class-items``); empty for a user's media.
    classes: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("image", "video"):
            raise ValueError(f"kind must be 'image' or 'video', not {self.kind!r}")
        if not self.frames:
            raise ValueError("Media needs at least one frame")
        if any(frame.mode != "RGB" for frame in self.frames):
            raise ValueError("Media frames must be RGB")


@dataclass(frozen=True)
class MediaLimits:
    """What :func:`load_media` accepts, and how many frames it samples from a video.

    Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) still applies on top of
    ``max_pixels``.
    """

    max_file_bytes: int = 200 * 2**20
    max_pixels: int = 64_000_000  # per image or frame
    max_video_seconds: float = 3 * 3600
    num_frames: int = 8

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_pixels", "num_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MediaLimits.{name} must be a positive int, not {value!r}")
        seconds = self.max_video_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise ValueError(f"MediaLimits.max_video_seconds must be > 0, not {seconds!r}")
        if not math.isfinite(seconds):
            raise ValueError("MediaLimits.max_video_seconds must be finite")


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_media(path: str | os.PathLike[str], limits: MediaLimits = MediaLimits()) -> Media:
    """Load an image or video file as RGB frames.

    Images give one frame (EXIF orientation applied, alpha composited over white, 16-bit and
    float data scaled to 8 bits). Videos and animated GIF/PNG/WebP give up to
    ``limits.num_frames`` frames sampled evenly over the duration.

    Raises:
        MediaError: for anything wrong with the file, with a one-sentence message for the user.
    """
    path = Path(path)
    name = _display_name(path)
    try:
        header = _check_file(path, name, limits)
        kind = _sniff(header)
        if kind == "image":
            return _load_image(path, name, limits)
        if kind == "heif":
            return _load_image(path, name, limits, heif=True)
        return _load_video(path, name, limits, sniffed=kind == "video")
    except MediaError:
        raise
    except Exception as exc:
        # Decoders fail in more ways than any list of exceptions covers; the user still gets a
        # sentence, and the log keeps the traceback for us.
        _log.exception("unexpected error loading %s", name)
        raise MediaError(
            f"Could not read '{name}' ({type(exc).__name__}); the file may be damaged, so try"
            " another one."
        ) from exc


# What `python -m flash bench` picks up from a folder: every suffix load_media reads (Pillow's for the
# formats above, and the video containers), so a folder gives the same files as naming them one by one.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS)
MEDIA_SUFFIXES = IMAGE_SUFFIXES | VIDEO_EXTENSIONS


def media_files(paths: list[str]) -> list[Path]:
    """Expand files and folders into a sorted list of media files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in MEDIA_SUFFIXES)
        else:
            out.append(p)
    return out


def load_media_files(paths: list[str]) -> list[tuple[Path, Media]]:
    """Every media file under ``paths``, loaded and checked (a bad one raises ``MediaError``): called
    before the model loads, so a wrong path fails in a second, not after the model's load."""
    return [(f, load_media(f)) for f in media_files(paths)]


def is_video_path(path: str | os.PathLike[str]) -> bool:
    """Guess cheaply, without decoding, whether ``path`` holds a video.

    Reads the first bytes of the file where it exists (so a renamed file is judged by its
    content); an animated GIF, PNG or WebP counts as a video, as :func:`load_media` returns it
    as one. Falls back to the file extension when the file is missing or unrecognised.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            header = f.read(_SNIFF_BYTES)
    except OSError:
        header = b""
    kind = _sniff(header)
    if kind == "image":
        return _is_animated(path)
    if kind in ("video", "heif"):
        return kind == "video"
    if kind == "audio":
        return False
    return path.suffix.lower() in VIDEO_EXTENSIONS


# Container families and the video codecs every major browser plays in them (a <video> element).
# FFmpeg names one demuxer for MP4 and QuickTime, and one for Matroska and WebM.
BROWSER_CODECS = {"mp4": frozenset({"h264", "av1"}), "webm": frozenset({"vp8", "vp9", "av1"})}
PREVIEW_MAX_SECONDS = 60.0
PREVIEW_MAX_SIDE = 640


def browser_playable(path: str | os.PathLike[str]) -> bool:
    """Whether browsers play the video at ``path`` as it is: H.264 or AV1 in MP4, VP8/VP9/AV1 in WebM.

    Anything else (MPEG-4 Part 2 from older cameras, HEVC, AVI, ...) needs :func:`browser_preview`.
    A file PyAV cannot open counts as not playable.
    """
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            names = set(container.format.name.split(","))
            if not container.streams.video:
                return False
            codec = container.streams.video[0].codec_context.name
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        return False
    family = "mp4" if "mp4" in names else "webm" if "webm" in names else None
    return family is not None and codec in BROWSER_CODECS[family]


def browser_preview(path: str | os.PathLike[str], folder: str | os.PathLike[str], *,
                    max_seconds: float = PREVIEW_MAX_SECONDS, max_side: int = PREVIEW_MAX_SIDE) -> Path:
    """A file of the video at ``path`` that browsers play: ``path`` itself where it already is
    (:func:`browser_playable`), else an H.264 MP4 made in ``folder`` from its first ``max_seconds``,
    scaled to at most ``max_side`` pixels a side, upright, without sound. Only for showing the clip:
    the race reads the original.

    Raises:
        MediaError: when the video cannot be decoded.
    """
    path = Path(path)
    if browser_playable(path):
        return path
    name = _display_name(path)
    out = Path(folder) / f"{path.stem}.preview.mp4"
    try:
        with _open_video(path, name) as source, av.open(str(out), "w", format="mp4",
                                                           options={"movflags": "+faststart"}) as sink:
            stream = source.streams.video[0]
            stream.thread_type = "AUTO"
            rate = _frame_rate(stream)
            encoder = None
            for time_s, frame in _timed(_decode(source, stream), stream):
                if time_s > max_seconds:
                    break
                image = _frame_to_rgb(frame)
                image.thumbnail((max_side, max_side))
                # yuv420p needs even sides
                image = image.crop((0, 0, max(image.width // 2 * 2, 2), max(image.height // 2 * 2, 2)))
                if encoder is None:
                    encoder = sink.add_stream("libx264", rate=round(rate))
                    encoder.width, encoder.height, encoder.pix_fmt = image.width, image.height, "yuv420p"
                    encoder.options = {"crf": "26", "preset": "veryfast"}
                for packet in encoder.encode(av.VideoFrame.from_image(image)):
                    sink.mux(packet)
            if encoder is None:
                raise _undecodable_error(name)
            for packet in encoder.encode():
                sink.mux(packet)
    except MediaError:
        out.unlink(missing_ok=True)
        raise
    except (av.error.FFmpegError, OSError, ValueError, MemoryError) as exc:
        out.unlink(missing_ok=True)
        raise _undecodable_error(name) from exc
    return out


# ---------------------------------------------------------------------------------------------
# File checks and sniffing


def _display_name(path: Path) -> str:
    """The file name, safe to put in a one-line message (control characters replaced)."""
    name = path.name or str(path)
    return "".join(ch if ch.isprintable() else "?" for ch in name)


def _check_file(path: Path, name: str, limits: MediaLimits) -> bytes:
    """Refuse missing, empty, unreadable and oversized files; return the first bytes."""
    try:
        if not path.exists():
            raise MediaError(f"Could not find the file '{name}'; check the path and try again.")
        if path.is_dir():
            raise MediaError(f"'{name}' is a folder, not a file; choose an image or video file.")
        size = path.stat().st_size
        if size == 0:
            raise MediaError(f"'{name}' is empty (0 bytes); choose a different file.")
        if size > limits.max_file_bytes:
            raise MediaError(
                f"'{name}' is {_format_bytes(size)}, over the"
                f" {_format_bytes(limits.max_file_bytes)} limit; choose a smaller file."
            )
        with path.open("rb") as f:
            return f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise MediaError(
            f"Could not read '{name}' ({_reason(exc)}); check the file and try again."
        ) from exc


def _format_bytes(n: int) -> str:
    """Human-readable size: '1.5 MB', '200 MB', '12 KB', '7 bytes'."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def _sniff(header: bytes) -> Literal["image", "video", "audio", "heif", "unknown"]:
    """Classify a file by its magic bytes."""
    if header.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00",
                          b"MM\x00*", b"II+\x00", b"MM\x00+")) or _is_bmp(header):
        return "image"
    riff = header[8:12] if header.startswith(b"RIFF") else b""
    if riff == b"WEBP":
        return "image"
    if riff in (b"AVI ", b"AVIX"):
        return "video"
    if riff == b"WAVE":
        return "audio"
    if header[4:8] == b"ftyp":
        brand = header[8:12].decode("latin-1")
        if brand in _IMAGE_BRANDS:
            return "heif"
        return "audio" if brand in _AUDIO_BRANDS else "video"
    if header[4:8] in (b"moov", b"mdat", b"wide"):  # QuickTime files older than the ftyp box
        return "video"
    if header.startswith((b"\x1a\x45\xdf\xa3", b"FLV\x01", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3",
                          b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")):  # Matroska/WebM, FLV, MPEG, ASF
        return "video"
    if len(header) > 188 and header[0] == header[188] == 0x47:  # MPEG-TS: a sync byte per packet
        return "video"
    if header.startswith((b"ID3", b"fLaC", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")):
        return "audio"
    return "unknown"


def _is_bmp(header: bytes) -> bool:
    """'BM' plus a known DIB header size: 'BM' alone also starts ordinary text."""
    return header.startswith(b"BM") and len(header) >= 18 and (
        struct.unpack_from("<I", header, 14)[0] in (12, 40, 52, 56, 64, 108, 124)
    )


def _is_animated(path: Path) -> bool:
    """Whether Pillow sees more than one animation frame (without decoding pixels)."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            return img.format in ANIMATED_FORMATS and getattr(img, "n_frames", 1) > 1
    except Exception:  # noqa: BLE001 - a guess; load_media reports the real problem
        return False


def _reason(exc: BaseException) -> str:
    """A short, single-line reason from a library exception, for inside a message."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text[:120].rstrip(".;: ")


# ---------------------------------------------------------------------------------------------
# Images


def _load_image(path: Path, name: str, limits: MediaLimits, heif: bool = False) -> Media:
    """Open with Pillow; animated GIF/PNG/WebP go to :func:`_load_animation`.

    ``heif`` marks an ISO-BMFF still image: Pillow reads AVIF but not HEIC (iPhone photos), so
    a failure there gets its own advice.
    """
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            _check_pixels(img.size, name, limits)
            if img.format in ANIMATED_FORMATS and getattr(img, "n_frames", 1) > 1:
                return _load_animation(img, name, limits)
            img.load()
            frame = _to_rgb(_exif_transpose(img))
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(name, limits) from exc
    # Pillow's plugins raise all of these on malformed data (struct.error from short headers).
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as exc:
        if heif:
            raise MediaError(
                f"'{name}' is a HEIC/HEIF photo, which this app cannot read;"
                " export it as JPEG or PNG."
            ) from exc
        raise MediaError(
            f"'{name}' could not be decoded as an image (it looks truncated or corrupt);"
            " try re-saving it as JPEG or PNG."
        ) from exc
    return Media(kind="image", frames=(frame,), source=name, size=frame.size)


def _check_pixels(size: tuple[int, int], name: str, limits: MediaLimits) -> None:
    """Refuse an image or frame whose header claims too many pixels, before decoding it."""
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"'{name}' claims a size of {width}x{height} pixels; the file is corrupt.")
    if width * height > limits.max_pixels:
        raise _bomb_error(name, limits, size)


def _bomb_error(name: str, limits: MediaLimits, size: tuple[int, int] | None = None) -> MediaError:
    dims = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return MediaError(
        f"'{name}' is {dims}, over the limit of {limits.max_pixels:,} pixels;"
        " resize it and try again."
    )


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - orientation is cosmetic; broken EXIF must not refuse a photo
        return img.copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha over white, high bit depths scaled down."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or "transparency" in img.info:
        return _composite_over_white(img.convert("RGBA"))
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def _composite_over_white(rgba: Image.Image) -> Image.Image:
    """Transparent areas become white, as most viewers show them."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map 16-bit, 32-bit int or float pixels to 0..255 instead of clipping them to white.

    Integer data that fits 16 bits is scaled by its full range (65535 -> 255); float data in
    [0, 1] by 255; anything else (negative or wider values) is stretched from its min to max.
    """
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    data = np.where(finite, data, 0.0)
    low, high = float(data.min()), float(data.max())
    if np.issubdtype(values.dtype, np.integer) and low >= 0 and high <= 65535:
        scaled = data / 257.0
    elif np.issubdtype(values.dtype, np.floating) and low >= 0 and high <= 1:
        scaled = data * 255.0
    elif high > low:
        scaled = (data - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _load_animation(img: Image.Image, name: str, limits: MediaLimits) -> Media:
    """An animated GIF/PNG/WebP as a video: frames sampled evenly by index."""
    count = int(img.n_frames)
    wanted = set(_even_indices(count, limits.num_frames))
    frames: list[Image.Image] = []
    duration_s = 0.0
    for index in range(count):
        img.seek(index)  # each frame builds on the previous one, so every frame is visited
        delay_ms = img.info.get("duration") or 0
        duration_s += delay_ms / 1000 if delay_ms > 0 else GIF_DEFAULT_FRAME_S
        if duration_s > limits.max_video_seconds:
            raise _too_long_error(name, duration_s, limits)
        if index in wanted:
            img.load()
            frames.append(_to_rgb(img.copy()))
    return Media(kind="video", frames=tuple(frames), source=name, size=img.size,
                 duration_s=duration_s)


def _even_indices(count: int, wanted: int) -> list[int]:
    """``wanted`` distinct indices in ``range(count)``, at the centres of equal segments."""
    k = min(count, wanted)
    return [int((i + 0.5) * count / k) for i in range(k)]


def _too_long_error(name: str, seconds: float, limits: MediaLimits) -> MediaError:
    return MediaError(
        f"'{name}' is {_format_duration(seconds)} long, over the"
        f" {_format_duration(limits.max_video_seconds)} limit; trim it and try again."
    )


def _format_duration(seconds: float) -> str:
    """'3 hours', '1.5 hours', '20 minutes', '45 seconds'."""
    for unit, scale in (("hour", 3600), ("minute", 60)):
        if seconds >= scale:
            value = f"{seconds / scale:.1f}".removesuffix(".0")
            return f"{value} {unit}" + ("" if value == "1" else "s")
    value = f"{seconds:.1f}".removesuffix(".0")
    return f"{value} second" + ("" if value == "1" else "s")


# ---------------------------------------------------------------------------------------------
# Videos


def _load_video(path: Path, name: str, limits: MediaLimits, sniffed: bool) -> Media:
    """Open with PyAV, check the stream and its length, and sample frames.

    ``sniffed`` says the magic bytes were a video container's, so a file FFmpeg cannot open is
    called damaged rather than of an unknown format.
    """
    with _open_video(path, name, sniffed) as container:
        stream = _video_stream(container, name, limits)
        duration_s = _duration(container, stream)
        rate = _frame_rate(stream)
        frame_count = stream.frames or 0
    if duration_s is None:
        duration_s = _scan_duration(path)  # e.g. WebM recorded by a browser: no header duration
    if duration_s is not None and duration_s > limits.max_video_seconds:
        raise _too_long_error(name, duration_s, limits)
    try:
        if duration_s is None:  # no duration and no timestamps: sample by frame index
            frames, duration_s = _sample_unknown_length(path, name, rate, limits)
        else:
            frames = _sample_frames(path, name, duration_s, frame_count, rate, limits)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, MemoryError) as exc:
        raise _undecodable_error(name) from exc
    if not frames:
        raise _undecodable_error(name)
    return Media(kind="video", frames=tuple(frames), source=name, size=frames[0].size,
                 duration_s=duration_s)


@contextmanager
def _open_video(path: Path, name: str, sniffed: bool = True) -> Iterator[InputContainer]:
    """``av.open`` for reading, with failure to open as a MediaError."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        if sniffed:
            raise MediaError(
                f"'{name}' looks like a video but could not be opened (it may be truncated or"
                " corrupt); try exporting it again."
            ) from exc
        raise _unknown_format_error(name) from exc
    with container:
        yield container


def _unknown_format_error(name: str) -> MediaError:
    return MediaError(f"'{name}' is not an image or video this app can read; {SUPPORTED_HINT}.")


def _undecodable_error(name: str) -> MediaError:
    return MediaError(
        f"Could not decode any frames from '{name}'; the video may be corrupt or use an"
        " unsupported codec, so try re-encoding it as H.264 MP4."
    )


def _video_stream(container: InputContainer, name: str, limits: MediaLimits) -> VideoStream:
    """The first video stream, refused if the container is a still image or has no video."""
    format_name = container.format.name
    if format_name in ("image2", "tty") or format_name.endswith("_pipe"):
        # FFmpeg reads many still-image formats; only the ones Pillow opens are supported.
        raise _unknown_format_error(name)
    if not container.streams.video:
        raise MediaError(
            f"'{name}' has no video stream (it looks like audio only); choose a video or an image."
        )
    stream = container.streams.video[0]
    if stream.codec_context is None:  # FFmpeg knows the container but has no decoder for it
        raise _undecodable_error(name)
    width, height = stream.codec_context.width, stream.codec_context.height
    if width and height:
        _check_pixels((width, height), name, limits)
    return stream


def _frame_rate(stream: VideoStream) -> float:
    """Nominal frames per second (30 when the container does not say)."""
    # FFmpeg's guess reads codec timing too (raw H.264 says 25 fps in average_rate by default).
    rate = stream.guessed_rate or stream.average_rate or stream.base_rate
    return float(rate) if rate and rate > 0 else 30.0


def _duration(container: InputContainer, stream: VideoStream) -> float | None:
    """Duration in seconds from stream or container metadata; ``None`` when neither has one."""
    if stream.duration and stream.duration > 0 and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _scan_duration(path: Path) -> float | None:
    """Duration from the packets' timestamps: reads the file but decodes nothing."""
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            first = end = None
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                first = packet.pts if first is None else min(first, packet.pts)
                end = max(end or packet.pts, packet.pts + (packet.duration or 0))
            if first is None or end is None or not stream.time_base or end <= first:
                return None
            return float((end - first) * stream.time_base)
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def _sample_frames(
    path: Path,
    name: str,
    duration_s: float,
    frame_count: int,
    rate: float,
    limits: MediaLimits,
) -> list[Image.Image]:
    """Frames on screen at ``num_frames`` evenly spaced times, in order, without repeats."""
    num_frames = limits.num_frames
    with _open_video(path, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: decoding is most of the cost
        targets = [(i + 0.5) * duration_s / num_frames for i in range(num_frames)]
        if (frame_count or round(duration_s * rate)) <= SEQUENTIAL_MAX_FRAMES:
            return _sample_sequentially(container, stream, targets)
        try:
            frames = _sample_by_seeking(container, stream, targets, duration_s / num_frames)
        except av.error.FFmpegError:
            frames = []
        if frames:
            return [_frame_to_rgb(frame) for frame in frames]
    # Unseekable stream, or seeking found nothing: start over and decode in one pass.
    with _open_video(path, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return _sample_sequentially(container, stream, targets)


def _sample_unknown_length(
    path: Path, name: str, rate: float, limits: MediaLimits
) -> tuple[list[Image.Image], float]:
    """Frames evenly spaced by index, and the duration at ``rate``, decoding the whole stream."""
    max_frames = math.ceil(limits.max_video_seconds * rate)
    with _open_video(path, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        sampled = _sample_by_index(_decode(container, stream), limits.num_frames, max_frames)
        if sampled is None:
            raise _too_long_error(name, max_frames / rate, limits)
        frames, count = sampled
        return [_frame_to_rgb(frame) for frame in frames], count / rate


def _sample_sequentially(
    container: InputContainer, stream: VideoStream, targets: list[float]
) -> list[Image.Image]:
    """Decode from the start, picking the frame on screen at each target time."""
    frames = _frames_at(_timed(_decode(container, stream), stream), targets)
    return [_frame_to_rgb(frame) for frame in frames]


def _decode(container: InputContainer, stream: VideoStream) -> Iterator[av.VideoFrame]:
    """Every decoded video frame passes through here (tests count them to prove seeking works)."""
    yield from container.decode(stream)


def _timed(frames: Iterator[av.VideoFrame], stream: VideoStream) -> TimedFrames:
    """Pair each frame with its time in seconds from the stream start.

    Frames without a timestamp (some AVI and raw streams) get one from their index and the rate.
    """
    start = stream.start_time or 0
    time_base = float(stream.time_base or 0)
    rate = _frame_rate(stream)
    for index, frame in enumerate(frames):
        if frame.pts is not None and time_base:
            yield (frame.pts - start) * time_base, frame
        else:
            yield index / rate, frame


def _frames_at(timed: TimedFrames, targets: list[float]) -> list[av.VideoFrame]:
    """For each target time, the frame on screen then: the last one starting at or before it.

    A target before the first frame takes the first frame; targets after the last frame take the
    last. Targets that fall on the same frame give it once, so a stream with fewer frames than
    targets returns each of its frames at most once.
    """
    picked: list[av.VideoFrame] = []
    previous: av.VideoFrame | None = None
    i = 0
    for time_s, frame in timed:
        # A microsecond of slack: timestamps are rounded to the time base.
        while i < len(targets) and time_s > targets[i] + 1e-6:
            _append_new(picked, previous if previous is not None else frame)
            i += 1
        if i == len(targets):
            break
        previous = frame
    else:
        if previous is not None and i < len(targets):
            _append_new(picked, previous)
    return picked


def _append_new(picked: list[av.VideoFrame], frame: av.VideoFrame) -> None:
    """Append unless it is the frame (same object or timestamp) picked last."""
    last = picked[-1] if picked else None
    if last is None or (last is not frame and (frame.pts is None or last.pts != frame.pts)):
        picked.append(frame)


def _sample_by_seeking(
    container: InputContainer,
    stream: VideoStream,
    targets: list[float],
    segment_s: float,
) -> list[av.VideoFrame]:
    """Seek to the keyframe before each target and decode forward to it.

    If a seek lands more than one segment before its target (keyframes are sparser than the
    targets), seeking again would decode the same stretch over, so decoding goes on in one pass
    from there for the remaining targets.
    """
    start = stream.start_time or 0
    picked: list[av.VideoFrame] = []
    for j, target in enumerate(targets):
        container.seek(start + int(target / stream.time_base), stream=stream, backward=True)
        timed = _timed(_decode(container, stream), stream)
        first = next(timed, None)
        if first is None:
            break  # sought past the end: the metadata duration was too long
        sparse_keyframes = first[0] < target - segment_s
        wanted = targets[j:] if sparse_keyframes else [target]
        for frame in _frames_at(_chain(first, timed), wanted):
            _append_new(picked, frame)
        if sparse_keyframes:
            break
    return picked


def _chain(first: T, rest: Iterator[T]) -> Iterator[T]:
    """Put a peeked item back in front of its iterator."""
    yield first
    yield from rest


def _sample_by_index(
    frames: Iterator[av.VideoFrame], num_frames: int, max_frames: int
) -> tuple[list[av.VideoFrame], int] | None:
    """Evenly spaced frames of a stream whose length is unknown until its end, and its length.

    Keeps a bounded reservoir: whenever it fills, every second frame is dropped and the stride
    doubles, so at most ``4 * num_frames`` frames are held however long the stream is. Returns
    ``None`` once the stream runs past ``max_frames``.
    """
    kept: list[tuple[int, av.VideoFrame]] = []
    stride = 1
    count = 0
    for index, frame in enumerate(frames):
        if index >= max_frames:
            return None
        count = index + 1
        if index % stride == 0:
            kept.append((index, frame))
            if len(kept) >= 4 * num_frames:
                kept = kept[::2]
                stride *= 2
    picked: list[av.VideoFrame] = []
    kept_indices = [index for index, _ in kept]
    for want in _even_indices(count, num_frames) if count else []:
        # The kept frame at or just before the wanted index (within one stride of it).
        position = max(0, bisect.bisect_right(kept_indices, want) - 1)
        _append_new(picked, kept[position][1])
    return picked, count


def _frame_to_rgb(frame: av.VideoFrame) -> Image.Image:
    """RGB PIL image of a decoded frame, turned upright by its display-matrix rotation."""
    image = frame.to_image()
    if image.mode != "RGB":
        image = image.convert("RGB")
    # PyAV's rotation is in counter-clockwise degrees, as are Pillow's ROTATE_* transposes.
    turn = _ROTATIONS.get(round(frame.rotation or 0) % 360)
    return image.transpose(turn) if turn is not None else image


_ROTATIONS = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}
