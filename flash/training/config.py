"""A training run's settings (no torch here: the CLI checks them before anything heavy loads)."""

from __future__ import annotations

from dataclasses import dataclass

MIXED_PRECISION = ("auto", "no", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (saved next to the draft)."""

    k: int = 4
    num_latents: int = 8
    num_layers: int = 1
    num_heads: int = 8
    intermediate_size: int = 1536
    draft_vocab_size: int = 4096
    epochs: int = 10
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    grad_accum: int = 4
    clip: float = 0.5
    ce_weight: float = 0.1
    noise: float = 0.2  # uniform noise amplitude, relative to the hidden states' std
    # Slot i's loss weight is slot_decay**i (normalised): slot i only pays off when slots 0..i-1 hit,
    # so the early slots matter most. 1.0 = FLASH's plain mean over slots.
    slot_decay: float = 1.0
    # Soft cross-entropy on the logits *after* the target's logits rules (repetition penalty,
    # n-gram ban, with the true prefix), i.e. on the distribution that picks the token. The default
    # model's rules change 46% of its raw argmax tokens, so matching the raw distribution is not enough.
    rules_ce: bool = False
    # The cross-entropy's target is softmax(target logits / teacher_temperature): below 1 it weighs
    # the target's top tokens more, which is what greedy acceptance asks the draft to rank right.
    teacher_temperature: float = 1.0
    seed: int = 0
    init_from: str = ""  # a saved draft to continue from (same shape, or fewer layers); "" = fresh
    # "bf16": the draft's matmuls and attention in bfloat16 under autocast (weights, optimizer, the
    # target's side of the loss and held-out metrics stay fp32); "no": all fp32; "auto": bf16 where
    # the hardware computes it natively (see :func:`resolve_mixed_precision`).
    mixed_precision: str = "no"
    # > 0: train for this many minutes instead of ``epochs`` epochs: after the warm-up the cosine decays
    # over the time (wall clock, including the per-epoch evaluations), and training stops when it is up.
    minutes: float = 0.0

    def __post_init__(self) -> None:
        if self.minutes < 0:
            raise ValueError("minutes must be >= 0")
        if self.epochs < 1 or self.grad_accum < 1 or self.lr <= 0 or self.slot_decay <= 0 \
                or self.teacher_temperature <= 0:
            raise ValueError("epochs, grad_accum, lr, slot_decay and teacher_temperature must be positive")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, not {self.mixed_precision!r}")

