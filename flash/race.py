"""A side-by-side race: plain autoregressive decoding (the baseline) against FLASH.

Both decoders run on the same target, prompt and settings, interleaved step by step in the calling
thread. Each side keeps its **own clock**: the time spent inside that side's decoding generator
(its ``next()`` calls), which covers its prefill, its draft prefill and every step, but not the
other side's turns. (``StepEvent.total_seconds`` is wall time since that generator started, so
while two generators interleave it also counts the other side's steps; it is not used here.)
The scheduler always advances the side whose own clock is behind, so both progress as they would
alone and neither waits on a GPU stream of the other (the target's clock synchronises the device
before every event).

Vocabulary (FLASH.md): *accepted* tokens are draft tokens the target verified; *target* tokens are
the target's own (each FLASH step's correction or bonus token, and every baseline token).

:func:`race` yields a :class:`RaceUpdate` after every step; :func:`on_one_clock` replays those
updates so that both sides are shown as of the same own-clock time, for a display that is fair
to both.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from threading import Event
from typing import Any, Literal

from flash.draft import FlashDraft
from flash.engine import GenerationConfig, StepEvent, collect, flash_method, generate
from flash.engine.near_ties import first_difference, near_tie_tolerance, top2_after
from flash.targets.base import Prompt, TargetModel

__all__ = ["BASELINE", "FLASH", "RaceFrame", "RaceRecorder", "RaceRecording", "RaceUpdate", "SideView",
           "compare_outputs", "on_one_clock", "race"]

BASELINE = "ar"
FLASH = "flash"
Origin = Literal["accepted", "target"]
_INCOMPLETE = "\ufffd"  # what a tokenizer decodes half a multi-byte character to


@dataclass(frozen=True)
class SideView:
    """One side of the race after its latest step; times are this side's own clock (seconds).

    The series have one entry per step, step 0 being the prefill (which emits the first token).
    """

    method: str
    tokens: tuple[int, ...] = ()
    text: str = ""
    segments: tuple[tuple[str, Origin], ...] = ()  # pieces of ``text`` tagged by origin
    seconds: float = 0.0
    done: bool = False
    times: tuple[float, ...] = ()  # own elapsed seconds after each step
    token_counts: tuple[int, ...] = ()  # tokens generated so far after each step
    accepted_per_step: tuple[int, ...] = ()  # accepted draft tokens of each step

    @property
    def steps(self) -> int:
        """Decoding steps after the prefill (target verification passes for FLASH)."""
        return max(len(self.times) - 1, 0)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def rates(self) -> tuple[float, ...]:
        """Tokens per second so far, after each step."""
        return tuple(n / t if t > 0 else 0.0 for n, t in zip(self.token_counts, self.times, strict=True))

    @property
    def tokens_per_step(self) -> tuple[int, ...]:
        """Tokens emitted by each step (accepted drafts + the target's own token, or fewer at the end)."""
        return tuple(b - a for a, b in pairwise((0, *self.token_counts)))


@dataclass(frozen=True)
class RaceUpdate:
    """What the race looks like after one step of one side.

    ``side`` and ``event`` are ``None`` only on the final update of a cancelled race. ``summary``
    is set on the last update (both sides done, or cancelled) and ``None`` before.
    """

    side: str | None
    event: StepEvent | None
    baseline: SideView
    flash: SideView
    summary: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.summary is not None


@dataclass(frozen=True)
class RaceFrame:
    """Both sides as of the same own-clock time ``clock`` (see :func:`on_one_clock`)."""

    clock: float
    baseline: SideView
    flash: SideView
    summary: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Text


class _IncrementalText:
    """Decodes a growing token list into text pieces tagged by origin.

    The whole list is decoded after each addition, so characters split over several tokens (UTF-8
    bytes, or a tokenizer's merging of spaces) come out right: a piece is held back while the text
    ends in a partial character, and if decoding ever rewrites earlier text, the pieces are cut
    back to the common prefix first. Invariant: ``"".join(pieces) == text``.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self.text = ""
        self.segments: list[tuple[str, Origin]] = []
        self._origin: Origin = "target"

    def extend(self, tokens: Iterable[int], origin: Origin) -> None:
        tokens = list(tokens)
        if not tokens:
            return
        self.tokens += tokens
        self._origin = origin
        text = self._decode(self.tokens)
        if not text.endswith(_INCOMPLETE):  # else wait for the rest of the character
            self._set(text, origin)

    def finish(self) -> None:
        """Flush text held back for a partial character (the generation ended inside it)."""
        self._set(self._decode(self.tokens), self._origin)

    def _set(self, text: str, origin: Origin) -> None:
        common = _common_prefix(self.text, text)
        if common < len(self.text):
            self.segments = _cut(self.segments, common)
        if len(text) > common:
            self.segments.append((text[common:], origin))
        self.text = text


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _cut(segments: list[tuple[str, Origin]], length: int) -> list[tuple[str, Origin]]:
    """The segments truncated to their first ``length`` characters."""
    kept, used = [], 0
    for piece, origin in segments:
        if used + len(piece) >= length:
            if length > used:
                kept.append((piece[: length - used], origin))
            break
        kept.append((piece, origin))
        used += len(piece)
    return kept


# ---------------------------------------------------------------------------------------------
# One side


@dataclass
class _Side:
    """One decoder of the race: its event stream, its own clock and what it produced so far."""

    method: str
    events_iter: Iterator[StepEvent]
    text: _IncrementalText
    events: list[StepEvent] = field(default_factory=list)
    seconds: float = 0.0
    done: bool = False
    times: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)

    def step(self) -> StepEvent | None:
        """Run one step on this side's own clock; ``None`` if the stream ended without a done event."""
        start = time.perf_counter()
        event = next(self.events_iter, None)  # the target syncs the device before emitting
        self.seconds += time.perf_counter() - start
        if event is None:
            self.done = True
            self.text.finish()
            return None
        self.events.append(event)
        accepted = event.tokens[: event.accepted]
        self.text.extend(accepted, "accepted")
        self.text.extend(event.tokens[event.accepted :], "target")
        self.times.append(self.seconds)
        self.token_counts.append(event.total_tokens)
        self.accepted_per_step.append(event.accepted)
        if event.done:
            self.done = True
            self.text.finish()
        return event

    def view(self) -> SideView:
        return SideView(self.method, tuple(self.text.tokens), self.text.text, tuple(self.text.segments),
                        self.seconds, self.done, tuple(self.times), tuple(self.token_counts),
                        tuple(self.accepted_per_step))

    def close(self) -> None:
        close = getattr(self.events_iter, "close", None)
        if close is not None:
            close()


def _behind(sides: list[_Side]) -> _Side:
    """The unfinished side with the least own time (the baseline on a tie)."""
    return min((side for side in sides if not side.done), key=lambda side: side.seconds)


# ---------------------------------------------------------------------------------------------
# The race


def race(target: TargetModel, draft: FlashDraft, media: Any, prompt_text: str, config: GenerationConfig, *,
         cancel: Event | None = None) -> Iterator[RaceUpdate]:
    """Race ``generate(..., "ar")`` against FLASH (:func:`flash_method`), yielding after every step.

    ``prompt_text`` empty means ``target.default_prompt(media)``. Setting ``cancel`` stops both
    sides before their next step; the race then ends with a summary marked ``cancelled: True``.
    """
    prompt = target.build_prompt(media, prompt_text.strip() or target.default_prompt(media))
    sides = [_Side(BASELINE, generate(target, prompt, "ar", None, config), _IncrementalText(target.decode)),
             _Side(FLASH, generate(target, prompt, flash_method(target), draft, config),
                   _IncrementalText(target.decode))]
    baseline, flash = sides
    try:
        while not (baseline.done and flash.done):
            if cancel is not None and cancel.is_set():
                yield RaceUpdate(None, None, baseline.view(), flash.view(),
                                 _summarize(target, draft, config, prompt, baseline, flash, cancelled=True))
                return
            side = _behind(sides)
            event = side.step()
            finished = baseline.done and flash.done
            summary = _summarize(target, draft, config, prompt, baseline, flash) if finished else None
            yield RaceUpdate(side.method, event, baseline.view(), flash.view(), summary)
    finally:
        for side in sides:
            side.close()


def _summarize(target: TargetModel, draft: FlashDraft, config: GenerationConfig, prompt: Prompt, baseline: _Side,
               flash: _Side, *, cancelled: bool = False) -> dict[str, Any]:
    """The race's numbers: speed-up on the sides' own clocks, τ, acceptance rate, exactness. A greedy race
    whose outputs differ also gets the target's top-2 logit gap at the first difference and whether it is
    a near-tie (:mod:`flash.engine.near_ties`): one plain decoding of the prefix, only then.

    Unrounded: the app formats them next to numbers it formats from the sides' views, and a value
    rounded twice (here, then for display) could show 5.92 s in one place and 5.91 s in the other."""
    flash_result = collect(flash.events) if flash.events else None
    base_stats, flash_stats = _side_stats(baseline), _side_stats(flash)
    base_rate, flash_rate = base_stats["tokens_per_s"], flash_stats["tokens_per_s"]
    identical, first_difference = compare_outputs(baseline.text.tokens, flash.text.tokens, greedy=config.greedy,
                                                  complete=not cancelled)
    gap = near_tie = None
    if identical is False:
        top1, top2 = top2_after(target, prompt, tuple(baseline.text.tokens[:first_difference]), config)
        gap, near_tie = top1 - top2, top1 - top2 <= near_tie_tolerance(top1, target.dtype)
    return {
        "speedup": flash_rate / base_rate if base_rate > 0 else None,
        "tau": flash_result.tau if flash_result else None,
        "acceptance_rate": flash_result.acceptance_rate if flash_result else None,
        "identical": identical,
        "first_difference": first_difference,
        "top2_gap": gap,  # None unless a greedy race's outputs differ
        "near_tie": near_tie,
        "baseline": base_stats,
        "flash": flash_stats,
        "k": min(config.k or draft.cfg.k, draft.cfg.k),
        "method": flash_method(target),
        "model": target.name,
        "temperature": config.temperature,
        "cancelled": cancelled,
    }


def difference_words(summary: dict[str, Any]) -> str:
    """'differs at token N (top-2 gap G: ...)' for a summary whose greedy outputs differ."""
    words = f"differs at token {summary['first_difference']}"
    if summary.get("top2_gap") is None:
        return words
    why = ("a near-tie, within the target's rounding" if summary["near_tie"]
           else "not a near-tie: a bug, please report it")
    return f"{words} (the target's top-2 logit gap there is {summary['top2_gap']:.2g}: {why})"


def _side_stats(side: _Side) -> dict[str, Any]:
    tokens = len(side.text.tokens)
    return {
        "new_tokens": tokens,
        "steps": max(len(side.events) - 1, 0),
        "seconds": side.seconds,
        "tokens_per_s": tokens / side.seconds if side.seconds > 0 else 0.0,
    }


def compare_outputs(baseline: list[int], flash: list[int], *, greedy: bool,
                    complete: bool = True) -> tuple[bool | None, int | None]:
    """(identical, first differing token index) of the two outputs.

    Only greedy decoding must match exactly; sampling gives ``(None, None)``. For an incomplete
    (cancelled) race a mismatch in the common part is still reported, otherwise it is unknown.
    """
    if not greedy:
        return None, None
    diff = first_difference(tuple(baseline), tuple(flash))
    if diff is not None and diff < min(len(baseline), len(flash)):
        return False, diff  # a mismatch in the common part
    if not complete:
        return None, None
    return (True, None) if diff is None else (False, diff)


# ---------------------------------------------------------------------------------------------
# Recording (for a replay after the race)


@dataclass(frozen=True)
class RaceRecording:
    """A race as it unfolded: each side's view after each of its steps, and the race's summary.

    Each side's views are in step order and carry that side's own clock (``SideView.seconds``), so
    the race can be replayed as :func:`on_one_clock` showed it: at own-clock time ``t`` each side
    shows its last view reached by ``t``.
    """

    baseline: tuple[SideView, ...]
    flash: tuple[SideView, ...]
    summary: dict[str, Any]

    @property
    def duration_s(self) -> float:
        """Own-clock seconds until the slower side ended (or the race was stopped)."""
        return max((views[-1].seconds for views in (self.baseline, self.flash) if views), default=0.0)

    def at(self, seconds: float) -> tuple[SideView, SideView]:
        """(baseline, FLASH) as shown at own-clock time ``seconds`` (empty views before a side's prefill)."""
        return (_view_at(self.baseline, seconds, BASELINE), _view_at(self.flash, seconds, FLASH))


def _view_at(views: tuple[SideView, ...], seconds: float, method: str) -> SideView:
    times = [view.seconds for view in views]
    index = bisect_right(times, seconds + 1e-9)  # a nanosecond of slack for float round-off
    return views[index - 1] if index else SideView(method)


class RaceRecorder:
    """Passes a race's updates through unchanged and keeps them as a :class:`RaceRecording`.

    ``recording`` is ``None`` until the race's last update (the one with the summary) has passed.
    """

    def __init__(self) -> None:
        self._views: dict[str, list[SideView]] = {BASELINE: [], FLASH: []}
        self.recording: RaceRecording | None = None

    def watch(self, updates: Iterable[RaceUpdate]) -> Iterator[RaceUpdate]:
        for update in updates:
            if update.side is not None:
                self._views[update.side].append(update.baseline if update.side == BASELINE else update.flash)
            if update.summary is not None:
                self.recording = RaceRecording(tuple(self._views[BASELINE]), tuple(self._views[FLASH]),
                                               update.summary)
            yield update


# ---------------------------------------------------------------------------------------------
# Display on one clock


def on_one_clock(updates: Iterable[RaceUpdate]) -> Iterator[RaceFrame]:
    """Replay a race so both sides are shown as of the same own-clock time.

    The race clock is the own time of the side that is behind (finished sides do not hold it
    back); a side's newer states wait until the clock reaches them. As both sides share one
    machine, this clock runs at about half of wall speed while both are decoding, and at full
    speed once one side has finished; it never runs ahead of wall time. A frame is yielded
    whenever something new becomes visible, and always for the final update (which shows all).
    """
    shown = {BASELINE: SideView(BASELINE), FLASH: SideView(FLASH)}
    waiting: dict[str, deque[SideView]] = {BASELINE: deque(), FLASH: deque()}
    for update in updates:
        latest = {BASELINE: update.baseline, FLASH: update.flash}
        if update.summary is not None:
            yield RaceFrame(max(v.seconds for v in latest.values()), update.baseline, update.flash, update.summary)
            return
        if update.side is not None:
            waiting[update.side].append(latest[update.side])
        running = [view.seconds for view in latest.values() if not view.done]
        clock = min(running) if running else max(view.seconds for view in latest.values())
        changed = False
        for side, queue in waiting.items():
            while queue and queue[0].seconds <= clock:
                shown[side] = queue.popleft()
                changed = True
        if changed:
            yield RaceFrame(clock, shown[BASELINE], shown[FLASH])
