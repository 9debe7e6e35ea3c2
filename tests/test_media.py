"""Tests for flash.media: real files of every supported kind, written into tmp_path at test time."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import write_video
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from flash import media
from flash.media import Media, MediaError, MediaLimits, is_video_path, load_media

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


# ---------------------------------------------------------------------------------------------
# Helpers


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple) and len(value) == 3
    return value


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def two_colour_image(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Left half red, right half blue: checks colour and orientation survive loading."""
    width, height = size
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (220, 30, 30)
    array[:, width // 2 :] = (30, 30, 220)
    return Image.fromarray(array)


def expect_error(path: Path, limits: MediaLimits | None, *words: str) -> str:
    """load_media must refuse with a one-line, one-sentence MediaError containing ``words``."""
    with pytest.raises(MediaError) as info:
        load_media(path, limits or MediaLimits())
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.endswith(".") and message.count(". ") == 0, message
    assert 20 < len(message) < 250, message
    assert "Traceback" not in message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def write_audio_only(path: Path, container_format: str | None = None, codec: str = "aac") -> Path:
    """One second of silence with no video stream."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=16000, layout="mono")
        samples_format = "fltp" if codec == "aac" else "s16"
        dtype = np.float32 if codec == "aac" else np.int16
        for index in range(16):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), dtype), format=samples_format, layout="mono"
            )
            frame.sample_rate = 16000
            frame.pts = index * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def grays(result: Media) -> list[int]:
    return [pixel(frame, (4, 4))[0] for frame in result.frames]


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_black_1bit_png(path: Path, width: int, height: int) -> Path:
    """A valid, all-black 1-bit PNG: a few KB on disk however many pixels it claims."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def count_decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every video frame flash.media decodes."""
    counter = [0]
    decode = media._decode

    def counting(container: object, stream: object) -> Iterator[av.VideoFrame]:
        for frame in decode(container, stream):  # type: ignore[arg-type]
            counter[0] += 1
            yield frame

    monkeypatch.setattr(media, "_decode", counting)
    return counter


# ---------------------------------------------------------------------------------------------
# Images: formats


@pytest.mark.parametrize(
    ("suffix", "save_format", "tolerance"),
    [
        (".jpg", "JPEG", 12),
        (".png", "PNG", 0),
        (".webp", "WEBP", 12),
        (".bmp", "BMP", 0),
        (".tif", "TIFF", 0),
        (".gif", "GIF", 4),
    ],
)
def test_image_formats(tmp_path: Path, suffix: str, save_format: str, tolerance: int) -> None:
    path = tmp_path / f"photo{suffix}"
    two_colour_image().save(path, save_format)
    result = load_media(path)
    assert result.kind == "image" and result.duration_s is None
    assert result.source == path.name
    assert result.size == (64, 48)
    (frame,) = result.frames
    assert frame.mode == "RGB" and frame.size == (64, 48)
    assert close_to(pixel(frame, (10, 24)), (220, 30, 30), tolerance)
    assert close_to(pixel(frame, (54, 24)), (30, 30, 220), tolerance)
    assert not is_video_path(path)


def test_one_pixel_image_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    result = load_media(path)
    assert result.size == (1, 1) and pixel(result.frames[0]) == (1, 2, 3)


def test_multipage_tiff_gives_first_page(tmp_path: Path) -> None:
    path = tmp_path / "pages.tif"
    first, second = Image.new("RGB", (8, 8), (200, 0, 0)), Image.new("RGB", (8, 8), (0, 200, 0))
    first.save(path, save_all=True, append_images=[second])
    result = load_media(path)
    assert result.kind == "image" and pixel(result.frames[0]) == (200, 0, 0)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow build has no AVIF codec")
def test_avif(tmp_path: Path) -> None:
    path = tmp_path / "photo.avif"
    two_colour_image().save(path, "AVIF", quality=90)
    result = load_media(path)
    assert result.kind == "image" and close_to(pixel(result.frames[0], (10, 24)), (220, 30, 30), 16)


def test_heic_gets_advice(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200))
    assert not is_video_path(path)
    expect_error(path, None, "HEIC", "JPEG")


def test_image_with_wrong_extension_is_sniffed(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.mp4"
    Image.new("RGB", (4, 4), (9, 9, 9)).save(path, "PNG")
    assert load_media(path).kind == "image"
    assert not is_video_path(path)


# ---------------------------------------------------------------------------------------------
# Images: modes


def test_grayscale(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (4, 4), 100).save(path)
    assert pixel(load_media(path).frames[0]) == (100, 100, 100)


def test_one_bit(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    Image.new("1", (4, 4), 1).save(path)
    assert pixel(load_media(path).frames[0]) == (255, 255, 255)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white, not black
        ("RGBA", (200, 0, 0, 255), (200, 0, 0)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half-transparent black over white
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (50, 255), (50, 50, 50)),
    ],
)
def test_alpha_is_composited_over_white(
    tmp_path: Path, mode: str, colour: tuple[int, ...], expected: tuple[int, int, int]
) -> None:
    path = tmp_path / "alpha.png"
    Image.new(mode, (4, 4), colour).save(path)
    assert close_to(pixel(load_media(path).frames[0]), expected, 1)


def test_palette_without_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    assert close_to(pixel(load_media(path).frames[0]), (10, 200, 30), 8)


@pytest.mark.parametrize("save_format", ["GIF", "PNG"])
def test_palette_with_transparency(tmp_path: Path, save_format: str) -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))  # right half: palette entry 1 (red); left half: entry 0
    path = tmp_path / f"sticker.{save_format.lower()}"
    image.save(path, save_format, transparency=0)
    frame = load_media(path).frames[0]
    assert pixel(frame, (1, 4)) == (255, 255, 255)  # transparent entry -> white
    assert pixel(frame, (6, 4)) == (200, 0, 0)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path, "JPEG", quality=95)  # pure cyan
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"
    assert close_to(pixel(load_media(path).frames[0], (8, 8)), (0, 255, 255), 8)


def sixteen_bit_gradient() -> np.ndarray:
    """0 .. 65535 left to right, 256 wide."""
    return np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))


def assert_gradient(result: Media) -> None:
    """A horizontal black-to-white ramp: not clipped to white, not flattened."""
    row = np.asarray(result.frames[0])[4, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253
    assert abs(row[128] - 128) <= 3
    assert np.all(np.diff(row) >= 0)
    assert (row == 255).mean() < 0.05  # the bug this guards against: everything > 255 is white


def test_16bit_png(tmp_path: Path) -> None:
    path = tmp_path / "depth.png"
    Image.fromarray(sixteen_bit_gradient()).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    assert_gradient(load_media(path))


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    path = tmp_path / "scan.tif"
    Image.fromarray(sixteen_bit_gradient().astype(">u2")).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16B"
    assert_gradient(load_media(path))


def test_32bit_int_tiff(tmp_path: Path) -> None:
    path = tmp_path / "int.tif"
    Image.fromarray(sixteen_bit_gradient().astype(np.int32)).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I"
    assert_gradient(load_media(path))


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (-5.0, 40.0)])
def test_float_tiff(tmp_path: Path, low: float, high: float) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.tile(np.linspace(low, high, 256, dtype=np.float32), (8, 1))).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "F"
    assert_gradient(load_media(path))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    two_colour_image((64, 32)).save(path, "JPEG", quality=95, exif=exif)
    result = load_media(path)
    assert result.size == (32, 64)
    # The left (red) half of the stored image is now the top half.
    assert close_to(pixel(result.frames[0], (16, 8)), (220, 30, 30), 16)
    assert close_to(pixel(result.frames[0], (16, 56)), (30, 30, 220), 16)


# ---------------------------------------------------------------------------------------------
# Animations


def write_animation(path: Path, frames: int, save_format: str = "GIF") -> Path:
    images = [Image.new("RGB", (16, 16), (i * 12, i * 12, i * 12)) for i in range(frames)]
    images[0].save(path, save_format, save_all=True, append_images=images[1:], duration=100,
                   loop=0)
    return path


def test_animated_gif_is_a_video(tmp_path: Path) -> None:
    path = write_animation(tmp_path / "loop.gif", 20)
    assert is_video_path(path)
    result = load_media(path)
    assert result.kind == "video" and len(result.frames) == 8
    assert result.duration_s == pytest.approx(2.0)
    levels = grays(result)
    assert levels == sorted(levels) and len(set(levels)) == 8
    assert close_to(tuple(levels), tuple(i * 12 for i in (1, 3, 6, 8, 11, 13, 16, 18)), 2)


def test_short_animation_returns_every_frame(tmp_path: Path) -> None:
    result = load_media(write_animation(tmp_path / "blink.gif", 3))
    assert result.kind == "video" and grays(result) == [0, 12, 24]


def test_static_gif_is_an_image(tmp_path: Path) -> None:
    path = write_animation(tmp_path / "still.gif", 1)
    assert not is_video_path(path) and load_media(path).kind == "image"


def test_animated_webp_is_a_video(tmp_path: Path) -> None:
    path = write_animation(tmp_path / "loop.webp", 10, "WEBP")
    result = load_media(path, MediaLimits(num_frames=4))
    assert result.kind == "video" and len(result.frames) == 4


# ---------------------------------------------------------------------------------------------
# Videos


def encoder_available(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except (av.error.FFmpegError, ValueError):
        return False
    return True


FAST_VPX = {"deadline": "realtime", "cpu-used": "8"}


@pytest.mark.parametrize(
    ("suffix", "codec", "options", "bit_rate"),
    [
        (".mp4", "libx264", None, None),
        (".mov", "libx264", None, None),
        (".mkv", "libx264", None, None),
        (".avi", "mpeg4", None, 2_000_000),
        (".webm", "libvpx-vp9", FAST_VPX, 1_000_000),
        (".webm", "libvpx", FAST_VPX, 1_000_000),
    ],
)
def test_video_containers(
    tmp_path: Path, suffix: str, codec: str, options: dict[str, str] | None, bit_rate: int | None
) -> None:
    if not encoder_available(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder")
    path = write_video(tmp_path / f"clip{suffix}", codec, options=options, bit_rate=bit_rate)
    assert is_video_path(path)
    result = load_media(path)
    assert result.kind == "video" and result.size == (64, 48)
    assert result.duration_s == pytest.approx(4.0, abs=0.15)
    assert all(frame.mode == "RGB" and frame.size == (64, 48) for frame in result.frames)
    # 40 frames at 10 fps, sampled at 0.25 s, 0.75 s, ...: frames 2, 7, 12, ... are on screen.
    expected = tuple(6 * (5 * i + 2) for i in range(8))
    assert close_to(tuple(grays(result)), expected, 7), grays(result)


def test_num_frames_limit(tmp_path: Path) -> None:
    result = load_media(write_video(tmp_path / "clip.mp4"), MediaLimits(num_frames=3))
    assert len(result.frames) == 3


def test_fewer_frames_than_asked(tmp_path: Path) -> None:
    path = write_video(tmp_path / "three.mp4", frames=3, gray=lambda i: 40 + 80 * i)
    result = load_media(path)
    assert close_to(tuple(grays(result)), (40, 120, 200), 4)


def test_single_frame_video(tmp_path: Path) -> None:
    result = load_media(write_video(tmp_path / "one.mp4", frames=1, gray=lambda i: 90))
    assert result.kind == "video" and close_to(tuple(grays(result)), (90,), 4)


def test_display_rotation_is_applied(tmp_path: Path) -> None:
    path = write_video(tmp_path / "portrait.mp4", frames=5, size=(64, 32), rotation=-90)
    result = load_media(path)
    assert result.size == (32, 64)
    assert all(frame.size == (32, 64) for frame in result.frames)


def test_raw_stream_without_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "camera.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(30):
            array = np.full((32, 32, 3), index * 8, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    result = load_media(path, MediaLimits(num_frames=5))
    levels = grays(result)
    assert len(levels) == 5 and levels == sorted(levels) and levels[-1] > 180


def test_unseekable_stream_falls_back_to_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "SEQUENTIAL_MAX_FRAMES", 0)  # take the seeking path
    monkeypatch.setattr(media, "_sample_by_seeking", lambda *args: [])
    result = load_media(write_video(tmp_path / "clip.mp4"))
    assert close_to(tuple(grays(result)), tuple(6 * (5 * i + 2) for i in range(8)), 7)


def test_seeking_on_a_short_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "SEQUENTIAL_MAX_FRAMES", 0)
    result = load_media(write_video(tmp_path / "clip.mp4", gop=5))
    assert close_to(tuple(grays(result)), tuple(6 * (5 * i + 2) for i in range(8)), 7)


def test_duration_from_packets_when_metadata_lacks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "_duration", lambda container, stream: None)
    result = load_media(write_video(tmp_path / "recording.webm", "libvpx", options=FAST_VPX))
    assert result.duration_s == pytest.approx(4.0, abs=0.15) and len(result.frames) == 8


def test_no_duration_and_no_timestamps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media, "_duration", lambda container, stream: None)
    monkeypatch.setattr(media, "_scan_duration", lambda path: None)
    path = write_video(tmp_path / "clip.mp4")
    result = load_media(path, MediaLimits(num_frames=3))
    assert result.duration_s == pytest.approx(4.0)
    levels = grays(result)
    # Wanted frames 6, 20, 33; the bounded reservoir may land up to a few frames earlier.
    assert len(levels) == 3 and levels == sorted(levels)
    assert close_to(tuple(levels), (36, 120, 198), 30), levels
    expect_error(path, MediaLimits(max_video_seconds=2), "trim")


def write_long_video(path: Path, gop: int) -> Path:
    """20 minutes at 1 fps; the grey level rises from 0 to 250 over the whole clip."""
    return write_video(path, frames=1200, fps=1, size=(32, 32), gop=gop,
                       gray=lambda i: round(i * 250 / 1199), options={"sc_threshold": "0"})


def assert_long_video_sampled(result: Media) -> None:
    assert result.duration_s == pytest.approx(1200, abs=1)
    # Targets at 75 s, 225 s, ...; one grey level is about 5 frames, so this is within ~20 s.
    expected = tuple(round((75 + 150 * i) * 250 / 1199) for i in range(8))
    assert close_to(tuple(grays(result)), expected, 4), grays(result)


def test_long_video_seeks_instead_of_decoding_everything(
    tmp_path: Path, count_decoded: list[int]
) -> None:
    path = write_long_video(tmp_path / "lecture.mp4", gop=10)
    start = time.perf_counter()
    result = load_media(path)
    elapsed = time.perf_counter() - start
    assert_long_video_sampled(result)
    assert count_decoded[0] < 200, f"decoded {count_decoded[0]} of 1200 frames"
    assert elapsed < 10


def test_long_video_with_one_keyframe_still_loads(tmp_path: Path, count_decoded: list[int]) -> None:
    # With no keyframes to seek to, one pass over the stream is the cheapest way through.
    result = load_media(write_long_video(tmp_path / "one_gop.mp4", gop=1200))
    assert_long_video_sampled(result)
    assert count_decoded[0] <= 1300


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nowhere.jpg", None, "nowhere.jpg", "could not find")


def test_folder(tmp_path: Path) -> None:
    expect_error(tmp_path, None, "folder")


@pytest.mark.parametrize("name", ["empty.jpg", "empty.mp4"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    expect_error(tmp_path / name, None, name, "empty")


@pytest.mark.parametrize("name", ["notes.mp4", "notes.jpg", "notes.png", "notes"])
def test_text_file_with_media_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("This is not a picture.\n" * 20)
    expect_error(path, None, name, "not an image or video")


def test_unknown_binary(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error(path, None, "blob.bin")


def jpeg_bytes() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, None, "cut.jpg", "truncated or corrupt")


def test_jpeg_header_only(tmp_path: Path) -> None:
    path = tmp_path / "stub.jpg"
    path.write_bytes(jpeg_bytes()[:40])
    expect_error(path, None, "stub.jpg")


def test_truncated_png(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    two_colour_image().save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:60])
    expect_error(path, None, "cut.png")


def test_truncated_mp4(tmp_path: Path) -> None:
    data = write_video(tmp_path / "full.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end, so it is lost
    expect_error(path, None, "cut.mp4", "corrupt")


def test_video_whose_frames_cannot_be_decoded(tmp_path: Path) -> None:
    data = bytearray(write_video(tmp_path / "good.mp4").read_bytes())
    at = data.index(b"mdat")
    size = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 : at - 4 + size] = bytes(size - 8)  # container intact, every frame zeroed
    path = tmp_path / "zeroed.mp4"
    path.write_bytes(bytes(data))
    expect_error(path, None, "zeroed.mp4", "could not decode")


@pytest.mark.parametrize(
    ("name", "container_format", "codec"),
    [("song.m4a", "mp4", "aac"), ("voice.mp4", "mp4", "aac"), ("memo.mp4", "wav", "pcm_s16le")],
)
def test_audio_only(tmp_path: Path, name: str, container_format: str, codec: str) -> None:
    path = write_audio_only(tmp_path / name, container_format, codec)
    expect_error(path, None, name, "has no video stream")


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    two_colour_image().save(path)
    message = expect_error(path, MediaLimits(max_file_bytes=100), "big.png", "100 bytes")
    assert "smaller" in message


def test_video_too_long(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4")
    expect_error(path, MediaLimits(max_video_seconds=2), "4 seconds", "2 seconds limit")


def test_animation_too_long(tmp_path: Path) -> None:
    expect_error(write_animation(tmp_path / "loop.gif", 30), MediaLimits(max_video_seconds=1),
                 "loop.gif", "trim")


def test_decompression_bomb_is_not_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 9000 x 9000 = 81 Mpx: over our 64 Mpx limit, under Pillow's own bomb threshold.
    path = write_black_1bit_png(tmp_path / "bomb.png", 9000, 9000)
    assert path.stat().st_size < 100_000

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(media.ImageOps, "exif_transpose", no_decoding)
    expect_error(path, None, "bomb.png", "9000x9000", "64,000,000")


def test_huge_decompression_bomb(tmp_path: Path) -> None:
    # 30000 x 30000 = 900 Mpx: Pillow refuses it while opening; still a MediaError.
    path = write_black_1bit_png(tmp_path / "huge.png", 30000, 30000)
    expect_error(path, None, "huge.png", "pixels")


def test_small_pixel_limit(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    two_colour_image().save(path)
    expect_error(path, MediaLimits(max_pixels=1000), "64x48")
    video = write_video(tmp_path / "clip.mp4")
    expect_error(video, MediaLimits(max_pixels=1000), "64x48")


def test_message_stays_on_one_line_for_odd_names(tmp_path: Path) -> None:
    path = tmp_path / "two\nlines.jpg"
    path.write_bytes(b"")
    expect_error(path, None, "two?lines.jpg")


# ---------------------------------------------------------------------------------------------
# API details


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_file_bytes": 0},
        {"max_pixels": -1},
        {"num_frames": 0},
        {"num_frames": 2.5},
        {"max_video_seconds": 0},
        {"max_video_seconds": float("inf")},
        {"max_video_seconds": float("nan")},
    ],
)
def test_limits_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MediaLimits(**kwargs)  # type: ignore[arg-type]


def test_is_video_path_without_a_file(tmp_path: Path) -> None:
    assert is_video_path(tmp_path / "missing.MOV")
    assert is_video_path("clip.webm")
    assert not is_video_path(tmp_path / "missing.png")


def test_is_video_path_sniffs_content(tmp_path: Path) -> None:
    renamed = tmp_path / "holiday.jpg"
    renamed.write_bytes(write_video(tmp_path / "clip.mp4").read_bytes())
    assert is_video_path(renamed)
    assert load_media(renamed).kind == "video"
    audio = write_audio_only(tmp_path / "song.m4a", "ipod")
    assert not is_video_path(audio)


def test_media_is_frozen(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (2, 2)).save(path)
    result = load_media(path)
    with pytest.raises(AttributeError):
        result.kind = "video"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Shipped examples


PHOTOS = ("cat.jpg", "coffee.jpg", "rocket.jpg")
VIDEOS = ("cat_pan.mp4", "coffee_rocket_cut.mp4", "coffee_pan.mp4")


@pytest.mark.parametrize("name", PHOTOS)
def test_example_photos(name: str) -> None:
    path = EXAMPLES / name
    assert path.stat().st_size < 1_000_000
    result = load_media(path)
    assert result.kind == "image" and max(result.size) <= 512
    assert np.asarray(result.frames[0]).std() > 20  # a real picture, not a flat fill


@pytest.mark.parametrize("name", VIDEOS)
def test_example_videos(name: str) -> None:
    path = EXAMPLES / name
    assert path.stat().st_size < 500_000
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    result = load_media(path)
    assert result.kind == "video" and len(result.frames) == 8
    assert 3.0 <= (result.duration_s or 0) <= 4.5
    # Sampled frames differ: the clip moves.
    first, last = (np.asarray(f, dtype=np.int16) for f in (result.frames[0], result.frames[-1]))
    assert np.abs(first - last).mean() > 5


def test_examples_are_reproducible(tmp_path: Path) -> None:
    from flash.examples import make_examples

    written = make_examples(tmp_path)
    assert sorted(path.name for path in written) == sorted(PHOTOS + VIDEOS)
    for path in written:
        shipped = EXAMPLES / path.name
        if path.suffix == ".jpg":
            assert path.read_bytes() == shipped.read_bytes(), path.name
        else:  # encoder builds may differ in bytes; the pictures must match
            new, old = load_media(path), load_media(shipped)
            for a, b in zip(new.frames, old.frames, strict=True):
                diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean()
                assert diff < 3, path.name


# ---------------------------------------------------------------------------------------------
# Robustness: garbage behind real magic numbers


MAGIC_PREFIXES = [
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"RIFF\x00\x10\x00\x00AVI LIST",
    b"\x00\x00\x00\x18ftypisom",
    b"\x1a\x45\xdf\xa3",
    b"BM\x00\x10\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00",
    b"II*\x00",
    b"",
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
@settings(
    max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prefix=st.sampled_from(MAGIC_PREFIXES), body=st.binary(min_size=0, max_size=600))
def test_garbage_gives_media_error_or_media(tmp_path: Path, prefix: bytes, body: bytes) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(prefix + body)
    try:
        result = load_media(path)
    except MediaError as exc:
        assert "\n" not in str(exc)
    else:  # garbage that happens to decode must still be a well-formed Media
        assert result.frames and all(frame.mode == "RGB" for frame in result.frames)


# ---------------------------------------------------------------------------------------------
# Previews a browser can play


def _decoded(path: Path) -> tuple[str, list[np.ndarray]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def test_mpeg4_part2_clip_gets_an_h264_preview(tmp_path: Path) -> None:
    # MPEG-4 Part 2 in MP4: what many cameras and phones export; browsers cannot play it.
    source = write_video(tmp_path / "camera.mp4", "mpeg4", frames=30, fps=10, size=(96, 64), bit_rate=2_000_000)
    assert not media.browser_playable(source)
    preview = media.browser_preview(source, tmp_path)
    assert preview != source and preview.parent == tmp_path and media.browser_playable(preview)
    codec, frames = _decoded(preview)
    assert codec == "h264" and len(frames) == 30 and frames[0].shape == (64, 96, 3)
    # The picture survives: frame i is flat grey at level 6 i.
    assert close_to(tuple(int(f.mean()) for f in frames[::10]), (0, 60, 120), 6)


def test_playable_videos_are_their_own_preview(tmp_path: Path) -> None:
    clips = [write_video(tmp_path / "clip.mp4")]
    if encoder_available("libvpx-vp9"):
        clips.append(write_video(tmp_path / "clip.webm", "libvpx-vp9", options=FAST_VPX, bit_rate=1_000_000))
    for clip in clips:
        assert media.browser_playable(clip) and media.browser_preview(clip, tmp_path) == clip
    assert not media.browser_playable(write_video(tmp_path / "clip.avi", "mpeg4", bit_rate=2_000_000))
    assert not media.browser_playable(EXAMPLES / "cat.jpg")


def test_preview_is_short_small_and_upright(tmp_path: Path) -> None:
    source = write_video(tmp_path / "long.avi", "mpeg4", frames=50, fps=10, size=(1280, 720), bit_rate=2_000_000,
                         gray=lambda i: i * 5)
    preview = media.browser_preview(source, tmp_path, max_seconds=2.0, max_side=320)
    codec, frames = _decoded(preview)
    assert codec == "h264" and 20 <= len(frames) <= 21 and frames[0].shape == (180, 320, 3)
    rotated = write_video(tmp_path / "turned.mp4", "mpeg4", size=(64, 48), rotation=90, bit_rate=2_000_000)
    assert _decoded(media.browser_preview(rotated, tmp_path))[1][0].shape == (64, 48, 3)  # shown upright


def test_preview_of_an_undecodable_video_is_a_media_error(tmp_path: Path) -> None:
    data = bytearray(write_video(tmp_path / "good.avi", "mpeg4", bit_rate=2_000_000).read_bytes())
    at = data.index(b"movi")
    data[at + 4 :] = bytes(len(data) - at - 4)  # container header intact, every frame zeroed
    path = tmp_path / "zeroed.avi"
    path.write_bytes(bytes(data))
    with pytest.raises(MediaError, match="zeroed.avi"):
        media.browser_preview(path, tmp_path)
    assert not (tmp_path / "zeroed.preview.mp4").exists()


def test_a_folder_gives_every_file_load_media_reads(tmp_path: Path) -> None:
    # `bench FOLDER` used to skip .m4v, .ts, .jfif ... that load_media reads when named one by one.
    write_video(tmp_path / "clip.m4v")
    (tmp_path / "sub").mkdir()
    write_video(tmp_path / "sub" / "clip.ts")
    Image.new("RGB", (32, 24), (200, 30, 30)).save(tmp_path / "photo.jfif", format="JPEG")
    (tmp_path / "notes.txt").write_text("not media")
    found = media.media_files([str(tmp_path)])
    assert [f.relative_to(tmp_path).as_posix() for f in found] == ["clip.m4v", "photo.jfif", "sub/clip.ts"]
    assert [m.kind for _, m in media.load_media_files([str(tmp_path)])] == ["video", "image", "video"]
