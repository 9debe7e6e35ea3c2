"""Per-request generation settings and the decoding methods' names."""

from __future__ import annotations

from dataclasses import dataclass, field

from flash.engine.logits_rules import LogitsRules

METHODS = ("ar", "eagle", "flash", "flash-tree", "pld")
#: The methods that run a draft model (``pld`` drafts from the prompt, ``ar`` not at all).
DRAFT_METHODS = ("eagle", "flash", "flash-tree")
#: The confidence cut the CLI and the app use by default (see GenerationConfig.min_draft_prob;
#: tuned on the shipped examples, docs/results.md).
DEFAULT_MIN_DRAFT_PROB = 0.1


@dataclass(frozen=True)
class TreeConfig:
    """``flash-tree``'s draft tree: at most ``nodes`` draft tokens per step, chosen best-first by joint
    draft probability among each slot's ``branch`` best tokens, none below ``min_prob`` (greedy only:
    a drawn tree's shape is fixed before its draws, cut by ``GenerationConfig.min_draft_prob``)."""

    nodes: int = 4
    branch: int = 2
    min_prob: float = 0.02

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.branch < 1:
            raise ValueError("tree nodes and tree branch must be >= 1")
        if not 0 <= self.min_prob < 1:
            raise ValueError("tree min_prob must be in [0, 1)")


@dataclass(frozen=True)
class GenerationConfig:
    """Per-request settings. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    k: int | None = None  # draft tokens per step; None = the draft's own k
    rules: LogitsRules = field(default_factory=LogitsRules)
    # Stop a step's draft where the draft's own confidence that *all* its tokens so far are right
    # (the product of its top-token probabilities, as EAGLE-2 ranks tree nodes) falls below this:
    # a weak draft then costs little instead of making every verification longer. Decided from
    # the draft alone, so the output stays exact. Read by ``flash``, ``eagle`` and sampled
    # ``flash-tree`` (its chain's depth); greedy ``flash-tree`` ranks every node by this same joint
    # probability and cuts at ``tree.min_prob`` instead (tuned apart, 0.02 vs 0.1 on the shipped
    # examples), so this does not change greedy ``flash-tree`` (tested, test_hf_targets.py).
    min_draft_prob: float = 0.0
    tree: TreeConfig = field(default_factory=TreeConfig)  # read by ``flash-tree`` only

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.k is not None and self.k < 1:
            raise ValueError("k must be >= 1")
        if not 0 <= self.min_draft_prob < 1:
            raise ValueError("min_draft_prob must be in [0, 1)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
