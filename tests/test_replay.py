"""Replays for slides: MP4, GIF and PNG card rendered from a race's recording (scripted and real)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from flash.race import BASELINE, FLASH, RaceRecorder, RaceRecording, SideView, race
from flash.replay import (
    GIF_FPS,
    HEIGHT,
    VIDEO_FPS,
    WIDTH,
    RaceReplay,
    _font,
    _wrap,
    frame_times,
    render_card,
    render_frame,
    write_card,
    write_gif,
    write_video,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


def _side(method: str, steps: list[list[tuple[str, str]]], step_s: float) -> tuple[SideView, ...]:
    """A side's view after each step; each step emits one token per (piece, origin), the accepted ones first."""
    views, tokens, segments, times, counts, accepted = [], [], [], [], [], []
    for i, pieces in enumerate(steps):
        tokens += range(len(tokens), len(tokens) + len(pieces))
        segments += pieces
        times.append((i + 1) * step_s)
        counts.append(len(tokens))
        accepted.append(sum(origin == "accepted" for _, origin in pieces))
        views.append(SideView(method, tuple(tokens), "".join(p for p, _ in segments), tuple(segments), times[-1],
                              i == len(steps) - 1, tuple(times), tuple(counts), tuple(accepted)))
    return tuple(views)


WORDS = "A tabby cat sits on a wooden table next to a cup of coffee and calmly looks up".split()  # 18


@pytest.fixture(scope="module")
def scripted() -> RaceReplay:
    """A 2.7 s race: the baseline writes a word per 0.15 s, FLASH three words per 0.3 s step (two accepted)."""
    words = [f"{word} " for word in WORDS]
    baseline = _side(BASELINE, [[(word, "target")] for word in words], 0.15)
    flash_steps = [[(w, "accepted") for w in words[i:i + 3][:-1]] + [(words[i:i + 3][-1], "target")]
                   for i in range(0, len(words), 3)]
    flash = _side(FLASH, flash_steps, 0.3)
    summary = {"speedup": 1.5, "tau": 3.0, "acceptance_rate": 0.5, "identical": True, "first_difference": None,
               "baseline": {"new_tokens": 18, "steps": 17, "seconds": 2.7, "tokens_per_s": 18 / 2.7},
               "flash": {"new_tokens": 18, "steps": 5, "seconds": 1.8, "tokens_per_s": 18 / 1.8},
               "k": 4, "method": "flash", "model": "scripted", "temperature": 0.0, "cancelled": False}
    thumbnail = Image.open(EXAMPLES / "cat.jpg").convert("RGB")
    thumbnail.thumbnail((480, 480))
    return RaceReplay(RaceRecording(baseline, flash, summary), "cat.jpg", thumbnail, "", "test machine")


def test_recording_shows_each_side_at_an_own_clock_time(scripted):
    recording = scripted.recording
    assert recording.duration_s == pytest.approx(2.7)
    baseline, flash = recording.at(0.0)
    assert baseline.tokens == flash.tokens == ()  # before either side's first step
    baseline, flash = recording.at(0.61)
    assert len(baseline.tokens) == 4 and len(flash.tokens) == 6
    baseline, flash = recording.at(recording.duration_s)
    assert baseline.done and flash.done and baseline.text == flash.text


def test_frame_times_cover_the_race_then_hold_its_end():
    times = frame_times(2.0, 15)
    assert times[0] == 0 and times[-1] == 2.0 and len(times) == 30  # 30 frames at 15 fps: 2 s
    assert all(b - a == pytest.approx(1 / 15) for a, b in zip(times[:-1], times[1:-1], strict=False))
    assert frame_times(2.0, 10, hold_s=3)[-31:] == [2.0] * 31
    assert len(frame_times(2.01, 10)) == 21
    assert frame_times(0.0, 10) == [0.0]
    with pytest.raises(ValueError, match="fps"):
        frame_times(1.0, 0)


def test_wrap_keeps_every_character_its_origin_and_the_width():
    font = _font(20)
    segments = [("Hello ", "target"), ("wor", "accepted"), ("ld, this is a caption\nwith a ", "target"),
                ("verylongwordthatcannotfitonasinglelineofthisbox", "accepted"), (" end.", "target")]
    text = "".join(piece for piece, _ in segments)
    origins = [origin for piece, origin in segments for _ in piece]
    lines = _wrap(segments, font, 200)
    assert len(lines) > 4
    shown = "".join(run.text for line in lines for run in line)
    assert re.sub(r"\s", "", shown) == re.sub(r"\s", "", text)  # only whitespace at a break may go
    position = 0
    for line in lines:
        for run in line:
            assert run.x + font.getlength(run.text.rstrip()) <= 200 + 1e-6
            position = text.index(run.text, position)
            assert set(origins[position:position + len(run.text)]) == {run.origin}
            position += len(run.text)
    assert [run.text for run in lines[0]][:3] == ["Hello ", "wor", "ld, "]  # one word in two colours


def _decode(path: Path) -> tuple[av.video.stream.VideoStream, list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        codec, width, height = stream.codec_context.name, stream.codec_context.width, stream.codec_context.height
        rate = float(stream.average_rate)
    return (codec, width, height, rate), frames, len(frames) / rate


def _differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_mp4_replays_the_race_in_real_time(scripted, tmp_path):
    path = write_video(scripted, tmp_path / "race.mp4")
    (codec, width, height, rate), frames, seconds = _decode(path)
    assert codec == "h264" and (width, height) == (WIDTH, HEIGHT) and rate == VIDEO_FPS
    duration = scripted.recording.duration_s
    assert abs(seconds - duration) <= max(0.1 * duration, 1 / VIDEO_FPS)
    first, middle, last = frames[0], frames[len(frames) // 2], frames[-1]
    assert _differ(first, middle) > 1 and _differ(middle, last) > 1 and _differ(first, last) > 1
    # The last frame is the result; H.264 at this quality keeps it close to the drawn picture.
    assert _differ(last, np.asarray(render_frame(scripted, duration))) < 2
    # Captions grow: the baseline's panel holds more ink at the end than halfway (dark pixels).
    panel = (slice(120, 380), slice(40, 620))
    assert (middle[panel] < 100).sum() < (last[panel] < 100).sum()


def test_gif_loops_the_race_and_holds_the_result(scripted, tmp_path):
    path = write_gif(scripted, tmp_path / "race.gif", hold_s=1.0)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.size == (WIDTH, HEIGHT) and gif.info.get("loop") == 0
        delays = []
        for index in range(gif.n_frames):
            gif.seek(index)
            delays.append(gif.info["duration"])
    assert len(delays) > 10
    # Pillow merges identical neighbours (the hold) into one longer frame; the total is what counts.
    expected_ms = 1000 * (scripted.recording.duration_s + 1.0)
    assert abs(sum(delays) - expected_ms) <= max(0.1 * expected_ms, 2000 / GIF_FPS)


def test_card_shows_the_result(scripted, tmp_path):
    path = write_card(scripted, tmp_path / "card.png")
    with Image.open(path) as card:
        assert card.format == "PNG" and card.size == (WIDTH, HEIGHT)
        pixels = np.asarray(card.convert("RGB"))
    assert (np.abs(pixels.astype(int) - (249, 115, 22)).sum(axis=2) < 30).sum() > 2000  # the orange headline
    assert pixels[100:300, 40:300].std() > 20  # the photo's thumbnail


def test_a_stopped_race_renders_too(scripted):
    recording = scripted.recording
    stopped = RaceRecording(recording.baseline[:3], recording.flash[:1],
                            {**recording.summary, "cancelled": True, "speedup": None, "identical": None})
    replay = RaceReplay(stopped)
    assert replay.recording.duration_s == pytest.approx(0.45)
    assert render_frame(replay, 0.45).size == render_card(replay).size == (WIDTH, HEIGHT)


def test_replay_of_a_real_race(smollm2_target, tmp_path, single_thread):
    from flash.engine import GenerationConfig
    from flash.media import load_media
    from flash.models import load_draft

    media = load_media(EXAMPLES / "cat.jpg")
    recorder = RaceRecorder()
    config = GenerationConfig(max_new_tokens=16, rules=smollm2_target.logits_rules())
    updates = list(recorder.watch(race(smollm2_target, load_draft(smollm2_target, quiet=True), media, "", config,
                                       cancel=threading.Event())))
    recording = recorder.recording
    assert recording is not None and recording.summary is updates[-1].summary
    assert recording.baseline[-1] == updates[-1].baseline and recording.flash[-1] == updates[-1].flash
    assert len(recording.baseline) + len(recording.flash) == len(updates)

    replay = RaceReplay.of(recording, media, "", "this machine")
    _, frames, seconds = _decode(write_video(replay, tmp_path / "race.mp4"))
    duration = recording.duration_s
    assert abs(seconds - duration) <= max(0.1 * duration, 1 / VIDEO_FPS)
    assert _differ(frames[0], frames[-1]) > 1
