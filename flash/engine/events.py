"""What the decoding loops yield and what a whole generation sums to, and the two helpers every loop
builds them with: its own clock and the emitter that applies EOS and ``max_new_tokens``."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from flash.engine.config import GenerationConfig
from flash.targets.base import TargetModel


@dataclass(frozen=True)
class StepEvent:
    """What one decoding step did. Times are seconds of this step; totals are cumulative.

    ``total_seconds`` is the loop's own time: time the consumer spends between steps is excluded.
    """

    method: str
    step: int  # 0 = prefill
    tokens: tuple[int, ...]  # emitted this step, in order
    accepted: int  # how many of ``tokens`` are accepted draft tokens (they come first)
    proposed: int  # draft tokens proposed this step
    draft_seconds: float
    verify_seconds: float
    total_tokens: int
    total_seconds: float
    done: bool


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation, summarised from its events."""

    method: str
    tokens: tuple[int, ...]
    steps: int  # verification (or decode) steps after the prefill
    accepted: int
    proposed: int
    seconds: float
    prefill_seconds: float
    draft_seconds: float
    verify_seconds: float

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per target verification pass, counting the target's own token (EAGLE's τ)."""
        return (self.new_tokens - 1) / self.steps if self.steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def collect(events) -> GenerationResult:
    """Consume a stream of events into a :class:`GenerationResult`."""
    events = list(events)
    first, last = events[0], events[-1]
    return GenerationResult(
        method=first.method,
        tokens=tuple(t for e in events for t in e.tokens),
        steps=len(events) - 1,
        accepted=sum(e.accepted for e in events),
        proposed=sum(e.proposed for e in events),
        seconds=last.total_seconds,
        prefill_seconds=first.verify_seconds,
        draft_seconds=sum(e.draft_seconds for e in events),
        verify_seconds=sum(e.verify_seconds for e in events[1:]),
    )


def _sync_every_gpu() -> None:
    """Wait for every GPU's queued work: a target split over GPUs (``device_map``) and its draft may run on
    other GPUs than the current one, which is all ``torch.cuda.synchronize()`` waits for."""
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


class Clock:
    """The loop's own time: perf_counter after a device sync, paused while the caller holds a yield.

    Counting only time spent inside the generator keeps tokens/s honest when a consumer
    interleaves two loops (the app's race) or does slow work between steps.
    """

    def __init__(self, device: torch.device) -> None:
        self.sync = _sync_every_gpu if device.type == "cuda" else (lambda: None)
        self.own = 0.0
        self.mark = self.now()

    def now(self) -> float:
        self.sync()  # GPU work is asynchronous: wait for it before reading the clock
        return time.perf_counter()

    def lap(self) -> float:
        """Own seconds so far (call just before yielding)."""
        t = self.now()
        self.own += t - self.mark
        self.mark = t
        return self.own

    def resume(self) -> None:
        """Call right after a yield returns: the time the consumer held is not ours."""
        self.mark = time.perf_counter()


class Emitter:
    """Applies EOS and max_new_tokens to emitted tokens and builds events."""

    def __init__(self, method: str, target: TargetModel, config: GenerationConfig, clock: Clock) -> None:
        self.method, self.eos, self.limit, self.clock = method, target.eos_token_ids, config.max_new_tokens, clock
        self.generated: list[int] = []
        self.step = 0
        self.done = False

    @property
    def room(self) -> int:
        return self.limit - len(self.generated)

    def emit(self, tokens: list[int], accepted: int, proposed: int, draft_s: float, verify_s: float) -> StepEvent:
        kept: list[int] = []
        for tok in tokens[: self.room]:
            kept.append(tok)
            if tok in self.eos:
                self.done = True
                break
        self.generated += kept
        self.done = self.done or self.room == 0
        event = StepEvent(self.method, self.step, tuple(kept), min(accepted, len(kept)), proposed, draft_s,
                          verify_s, len(self.generated), self.clock.lap(), self.done)
        self.step += 1
        return event
