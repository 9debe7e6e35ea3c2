"""The side-by-side race: real races on the default target, and scripted ones for exact bookkeeping."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flash import race as race_module
from flash.engine import GenerationConfig, StepEvent
from flash.race import BASELINE, FLASH, RaceRecorder, SideView, compare_outputs, difference_words, on_one_clock, race

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
SUMMARY_KEYS = {"speedup", "tau", "acceptance_rate", "identical", "first_difference", "top2_gap", "near_tie",
                "baseline", "flash", "k", "method", "model", "cancelled"}
SIDE_KEYS = {"new_tokens", "steps", "seconds", "tokens_per_s"}


@pytest.fixture(scope="module")
def draft(smollm2_target):
    from flash.models import load_draft

    return load_draft(smollm2_target, quiet=True)  # the shipped draft, or an untrained one (still exact)


@pytest.fixture(scope="module")
def cat():
    from flash.media import load_media

    return load_media(EXAMPLES / "cat.jpg")


def _config(target, **kwargs) -> GenerationConfig:
    return GenerationConfig(rules=target.logits_rules(), **kwargs)


# --- real races -----------------------------------------------------------------------------------


def test_greedy_race_is_identical_and_summarised(smollm2_target, draft, cat, single_thread):
    updates = list(race(smollm2_target, draft, cat, "", _config(smollm2_target, max_new_tokens=16)))
    last = updates[-1]
    summary = last.summary

    assert all(u.summary is None for u in updates[:-1]) and last.done
    assert SUMMARY_KEYS <= summary.keys() and SIDE_KEYS <= summary["baseline"].keys() <= summary["flash"].keys()
    assert summary["identical"] is True and summary["first_difference"] is None and not summary["cancelled"]
    assert last.baseline.tokens == last.flash.tokens and 0 < len(last.flash.tokens) <= 16
    assert summary["baseline"]["new_tokens"] == summary["flash"]["new_tokens"] == len(last.flash.tokens)
    assert summary["tau"] >= 1.0 and 0.0 <= summary["acceptance_rate"] <= 1.0
    base, flash = summary["baseline"], summary["flash"]
    assert summary["speedup"] == pytest.approx(flash["tokens_per_s"] / base["tokens_per_s"], rel=1e-2)
    assert summary["k"] == draft.cfg.k and summary["model"] == smollm2_target.name
    assert summary["method"] == "flash-tree"  # greedy on a target that verifies trees

    # Text: decoded from the tokens, and FLASH's tagged pieces add up to exactly that text.
    assert last.baseline.text == smollm2_target.decode(list(last.baseline.tokens)) == last.flash.text
    assert "".join(piece for piece, _ in last.flash.segments) == last.flash.text
    accepted_pieces = [piece for piece, origin in last.flash.segments if origin == "accepted"]
    assert bool(accepted_pieces) == (sum(last.flash.accepted_per_step) > 0)

    # Series: one point per step, own clocks increasing.
    for view in (last.baseline, last.flash):
        assert len(view.times) == len(view.token_counts) == view.steps + 1
        assert list(view.times) == sorted(view.times) and view.times[-1] == pytest.approx(view.seconds)
        assert sum(view.tokens_per_step) == len(view.tokens)


def test_race_advances_the_side_whose_own_clock_is_behind(smollm2_target, draft, cat, single_thread):
    updates = list(race(smollm2_target, draft, cat, "", _config(smollm2_target, max_new_tokens=12)))
    for before, after in zip(updates, updates[1:], strict=False):
        mine = getattr(before, "baseline" if after.side == BASELINE else "flash")
        other = before.flash if after.side == BASELINE else before.baseline
        assert other.done or mine.seconds <= other.seconds
    assert {u.side for u in updates} == {BASELINE, FLASH}


def test_video_race_uses_the_video_prompt(smollm2_target, draft, single_thread):
    from flash.media import load_media

    video = load_media(EXAMPLES / "coffee_pan.mp4")
    last = list(race(smollm2_target, draft, video, "  ", _config(smollm2_target, max_new_tokens=6)))[-1]
    assert last.summary["identical"] is True and last.flash.text


def test_sampling_race_has_no_exactness_verdict(smollm2_target, draft, cat, single_thread):
    config = _config(smollm2_target, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    summary = list(race(smollm2_target, draft, cat, "What is this?", config))[-1].summary
    assert summary["identical"] is None and summary["first_difference"] is None
    assert summary["temperature"] == 0.8 and summary["flash"]["new_tokens"] > 0
    assert summary["method"] == "flash-tree"  # sampling races the drawn tree too (measured ahead of the chain)


def test_cancel_stops_both_sides_promptly(smollm2_target, draft, cat, single_thread):
    cancel = threading.Event()
    updates = []
    stopped_at = None
    for update in race(smollm2_target, draft, cat, "", _config(smollm2_target, max_new_tokens=200), cancel=cancel):
        updates.append(update)
        if len(updates) == 4:
            cancel.set()
            stopped_at = time.perf_counter()
    assert time.perf_counter() - stopped_at < 2.0  # nothing ran after the cancel
    last = updates[-1]
    assert len(updates) == 5 and last.side is None and last.event is None
    assert last.summary["cancelled"] is True and last.summary["identical"] is None
    assert not (last.baseline.done and last.flash.done)
    assert last.summary["baseline"]["new_tokens"] + last.summary["flash"]["new_tokens"] < 20


def test_cancel_before_the_start_gives_an_empty_summary(smollm2_target, draft, cat):
    cancel = threading.Event()
    cancel.set()
    (only,) = list(race(smollm2_target, draft, cat, "", _config(smollm2_target, max_new_tokens=8), cancel=cancel))
    assert only.summary["cancelled"] is True and only.summary["speedup"] is None and only.summary["tau"] is None
    assert only.baseline.tokens == only.flash.tokens == ()


# --- scripted races: exact bookkeeping without a model --------------------------------------------


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _scripted(clock: _FakeClock, method: str, steps: list[tuple[tuple[int, ...], int]], cost: float):
    """A decoding generator that emits ``steps`` ((tokens, accepted) each), each costing ``cost`` s."""
    total = 0
    for i, (tokens, accepted) in enumerate(steps):
        clock.now += cost
        total += len(tokens)
        yield StepEvent(method, i, tokens, accepted, 4 if i else 0, 0.0, cost, total, clock.now, i == len(steps) - 1)


@pytest.fixture
def scripted_race(monkeypatch):
    """race() over scripted events: tokens are UTF-8 bytes, AR steps cost 1 s and FLASH steps 2.5 s."""
    clock = _FakeClock()
    real_top2_after = race_module.top2_after
    monkeypatch.setattr(race_module, "time", clock)

    def run(ar_steps, flash_steps, **config):
        def fake_generate(target, prompt, method, draft, config):
            steps, cost = (ar_steps, 1.0) if method == "ar" else (flash_steps, 2.5)
            return _scripted(clock, method, steps, cost)

        monkeypatch.setattr(race_module, "generate", fake_generate)
        if race_module.top2_after is real_top2_after:  # the scripted target cannot decode; a test may script it
            monkeypatch.setattr(race_module, "top2_after", lambda target, prompt, prefix, config: (1.0, 0.0))
        target = SimpleNamespace(name="bytes", supports_tree=False, build_prompt=lambda media, text: text,
                                 dtype=torch.float32,
                                 default_prompt=lambda media: "describe",
                                 decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"))
        draft = SimpleNamespace(cfg=SimpleNamespace(k=4))
        return list(race(target, draft, None, "", GenerationConfig(**config)))

    return run


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_segments_tag_origins_and_keep_multibyte_characters_whole(scripted_race):
    h, e1, e2, excl = _utf8("Hé!")  # 'é' is two bytes: the draft proposes the first, the target the second
    flash_steps = [((h,), 0), ((e1, e2), 1), ((excl, *_utf8("ok")), 2)]
    updates = scripted_race([((t,), 0) for t in _utf8("Hé!ok")], flash_steps, max_new_tokens=6)
    flash = updates[-1].flash
    assert flash.text == "Hé!ok" and "\ufffd" not in "".join(u.flash.text for u in updates)
    assert flash.segments == (("H", "target"), ("é", "target"), ("!o", "accepted"), ("k", "target"))
    assert flash.accepted_per_step == (0, 1, 2) and flash.tokens_per_step == (1, 2, 3)
    summary = updates[-1].summary
    assert summary["identical"] is True and summary["tau"] == 2.5 and summary["acceptance_rate"] == 3 / 8
    assert summary["baseline"] == {"new_tokens": 6, "steps": 5, "seconds": 6.0, "tokens_per_s": 1.0}
    assert summary["flash"] == {"new_tokens": 6, "steps": 2, "seconds": 7.5, "tokens_per_s": 0.8}
    assert summary["speedup"] == 0.8


def test_scheduling_follows_the_own_clocks(scripted_race):
    updates = scripted_race([((65,), 0)] * 5, [((66,), 0), ((66, 66), 1)])
    # AR ends steps at t=1,2,3,4,5 and FLASH at 2.5,5: the side behind (AR on a tie) steps next.
    assert [u.side for u in updates] == ["ar", "flash", "ar", "ar", "flash", "ar", "ar"]


def test_a_differing_output_is_reported_at_its_first_token_with_the_top2_gap(scripted_race, monkeypatch):
    """A greedy race whose outputs differ says where, and how close the target's two best tokens were there
    (plain decoding of the baseline's prefix): a near-tie within the dtype's rounding, or a bug."""
    asked = []

    def top2_after(target, prompt, prefix, config):
        asked.append((prompt, prefix))
        return top2

    monkeypatch.setattr(race_module, "top2_after", top2_after)
    for top2, near_tie in (((12.0, 11.9995), True), ((12.0, 9.5), False)):
        updates = scripted_race([((t,), 0) for t in b"abcd"], [((97,), 0), ((98, 120), 1), ((100,), 0)])
        summary = updates[-1].summary
        assert summary["identical"] is False and summary["first_difference"] == 2
        assert summary["top2_gap"] == pytest.approx(top2[0] - top2[1]) and summary["near_tie"] is near_tie
        assert asked.pop() == ("describe", tuple(b"ab")) and not asked  # once, at the end
        words = difference_words(summary)
        assert words.startswith("differs at token 2 (") and ("a bug" in words) is not near_tie
    same = scripted_race([((t,), 0) for t in b"ab"], [((97, 98), 1)])[-1].summary
    assert same["identical"] is True and same["top2_gap"] is None and same["near_tie"] is None and not asked


def test_compare_outputs():
    assert compare_outputs([1, 2, 3], [1, 2, 3], greedy=True) == (True, None)
    assert compare_outputs([1, 2, 3], [1, 2], greedy=True) == (False, 2)
    assert compare_outputs([1, 2], [1, 2, 3], greedy=True, complete=False) == (None, None)
    assert compare_outputs([1, 5], [1, 2, 3], greedy=True, complete=False) == (False, 1)
    assert compare_outputs([1], [2], greedy=False) == (None, None)


def test_on_one_clock_shows_both_sides_at_the_same_own_time(scripted_race):
    updates = scripted_race([((65,), 0)] * 6, [((66,), 0), ((66, 66), 1), ((66, 66, 66), 2)])
    frames = list(on_one_clock(updates))
    for frame in frames[:-1]:
        assert frame.baseline.seconds <= frame.clock and frame.flash.seconds <= frame.clock
        assert frame.summary is None
    assert [f.clock for f in frames] == sorted(f.clock for f in frames)
    assert frames[-1].summary is updates[-1].summary
    assert frames[-1].baseline == updates[-1].baseline and frames[-1].flash == updates[-1].flash


def test_recording_replays_what_the_one_clock_display_showed(scripted_race):
    updates = scripted_race([((65,), 0)] * 6, [((66,), 0), ((66, 66), 1), ((66, 66, 66), 2)])
    recorder = RaceRecorder()
    assert list(recorder.watch(updates)) == updates  # passed through unchanged
    recording = recorder.recording
    assert recording.summary is updates[-1].summary and recording.duration_s == 7.5
    assert [len(v.tokens) for v in recording.baseline] == [1, 2, 3, 4, 5, 6]
    assert [len(v.tokens) for v in recording.flash] == [1, 3, 6]
    for frame in on_one_clock(updates):
        assert recording.at(frame.clock) == (frame.baseline, frame.flash)
    assert recording.at(0.5) == (SideView(BASELINE), SideView(FLASH))  # before the first step


def test_recorder_has_no_recording_before_the_summary(scripted_race):
    updates = scripted_race([((65,), 0)] * 3, [((66,), 0)])
    recorder = RaceRecorder()
    watched = recorder.watch(updates)
    next(watched)
    assert recorder.recording is None
    list(watched)
    assert recorder.recording is not None
