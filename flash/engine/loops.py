"""Decoding loops: plain autoregressive (``ar``), EAGLE-style (``eagle``), ``flash`` and prompt lookup (``pld``).

Every loop is a generator of :class:`StepEvent`; the app, the CLI and the benchmark consume only
these events. One speculative step reads top to bottom: draft -> verify -> accept -> roll back
caches -> emit event. Step 0 is the prefill, which emits the target's first token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from flash.draft import DraftState, FlashDraft
from flash.engine.logits_rules import LogitsRules, RulesCursor
from flash.engine.tree import DraftTree, best_after_changes, build_tree, tree_attention, walk_sampled_tree, walk_tree
from flash.engine.verification import (
    draw_siblings,
    greedy_verify,
    logits_to_probs,
    make_generator,
    sample,
    sampling_verify,
    sibling_verify,
)
from flash.targets.base import Prompt, TargetModel

METHODS = ("ar", "eagle", "flash", "flash-tree", "pld")
#: The confidence cut the CLI and the app use by default (see GenerationConfig.min_draft_prob;
#: tuned on the shipped examples, docs/results.md).
DEFAULT_MIN_DRAFT_PROB = 0.1
#: Entries beyond the branching factor that a draft tree reads from each slot's row: enough for the
#: few scores a branch's path lowers (its new tokens' penalty, its bans) to leave the top decided.
_TREE_SPARE = 8


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
    # probability and cuts at ``tree_min_prob`` instead (tuned apart, 0.02 vs 0.1 on the shipped
    # examples), so this does not change greedy ``flash-tree`` (tested, test_hf_targets.py).
    min_draft_prob: float = 0.0
    # ``flash-tree``: at most this many draft tokens per step, chosen best-first by joint draft
    # probability among each slot's ``tree_branch`` best tokens, none below ``tree_min_prob``
    # (greedy only: a drawn tree's shape is fixed before its draws, cut by ``min_draft_prob``).
    tree_nodes: int = 4
    tree_branch: int = 2
    tree_min_prob: float = 0.02

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
        if self.tree_nodes < 1 or self.tree_branch < 1:
            raise ValueError("tree_nodes and tree_branch must be >= 1")
        if not 0 <= self.tree_min_prob < 1:
            raise ValueError("tree_min_prob must be in [0, 1)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


class _Clock:
    """The loop's own time: perf_counter after a device sync, paused while the caller holds a yield.

    Counting only time spent inside the generator keeps tokens/s honest when a consumer
    interleaves two loops (the app's race) or does slow work between steps.
    """

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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


class _Emitter:
    """Applies EOS and max_new_tokens to emitted tokens and builds events."""

    def __init__(self, method: str, target: TargetModel, config: GenerationConfig, clock: _Clock) -> None:
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


def _choose(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> int:
    """The target's own next token from processed logits [V]."""
    if config.greedy:
        return int(logits.argmax())
    return int(sample(logits_to_probs(logits, config.temperature, config.top_p), generator))


def flash_method(target: TargetModel) -> str:
    """The FLASH variant the app's race and ``caption --method auto`` run: the draft tree on targets
    that verify trees, greedy or sampling (ahead of the chain in every paired measurement here,
    docs/results.md), the chain on flash-attention targets, which cannot verify trees."""
    return "flash-tree" if target.supports_tree else "flash"


def generate(target: TargetModel, prompt: Prompt, method: str = "flash", draft: FlashDraft | None = None,
             config: GenerationConfig = GenerationConfig()) -> Iterator[StepEvent]:
    """Decode ``prompt`` with ``method``, yielding one :class:`StepEvent` per step."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "ar":
        return _autoregressive(target, prompt, config)
    if method == "pld":
        return _speculative(target, prompt, _PromptLookupProposer(config.k or 8, target.vocab_size), method, config)
    if draft is None:
        raise ValueError(f"method '{method}' needs a draft model")
    k = config.k or draft.cfg.k
    if method in ("flash", "flash-tree"):
        k = min(k, draft.cfg.k)  # one slot per draft token (per tree depth)
    if method == "flash-tree":
        if not target.supports_tree:
            raise ValueError(f"this target ({target.name}) cannot verify draft trees; use 'flash'")
        return _speculative_tree(target, prompt, _DraftProposer(draft, False, k), config)
    return _speculative(target, prompt, _DraftProposer(draft, method == "eagle", k), method, config)


def _prefill(target: TargetModel, prompt: Prompt, config: GenerationConfig, clock: _Clock, out: _Emitter,
             generator: torch.Generator):
    """Step 0 of every loop: prefill the prompt and choose the target's first token."""
    t0 = clock.now()
    pre = target.prefill(prompt)
    token = _choose(config.rules.apply(pre.last_logits[None], out.generated, 0)[0], config, generator)
    return pre, token, out.emit([token], 0, 0, 0.0, clock.now() - t0)


def _begin(target: TargetModel, prompt: Prompt, method: str, config: GenerationConfig):
    """What every loop starts with: its clock, emitter and generator, then the prefill (step 0).

    Returns (clock, emitter, generator, prefill output, the target's first token, step 0's event).
    """
    clock = _Clock(target.device)
    out = _Emitter(method, target, config, clock)
    generator = make_generator(config.seed, target.device)
    pre, token, event = _prefill(target, prompt, config, clock, out, generator)
    return clock, out, generator, pre, token, event


@torch.inference_mode()
def _autoregressive(target: TargetModel, prompt: Prompt, config: GenerationConfig) -> Iterator[StepEvent]:
    clock, out, generator, pre, token, event = _begin(target, prompt, "ar", config)
    yield event
    clock.resume()
    state = pre.state
    # The rules' state grown token by token, as flash-tree keeps it (the baseline gets the same care):
    # no walk over the prefix and no copy of the logits row per step.
    cursor = config.rules.cursor(out.generated) if config.rules.active else None
    while not out.done:
        t0 = clock.now()
        logits, _ = target.forward(state, torch.tensor([[token]], device=target.device))
        row = logits[-1] if cursor is None else cursor.process_(logits[-1])  # the forward's own tensor
        token = _choose(row, config, generator)
        yield out.emit([token], 0, 0, 0.0, clock.now() - t0)
        clock.resume()
        if cursor is not None:
            cursor.push(token)
    clock.resume()


class _DraftProposer:
    """FLASH / EAGLE proposals from the trained draft, which follows the target's accepted states."""

    def __init__(self, draft: FlashDraft, eagle: bool, k: int) -> None:
        self.draft, self.eagle, self.k = draft, eagle, k
        self.device = draft.slot_embed.device  # the target's input device (models.load_draft puts it there)

    def start(self, target: TargetModel, prompt: Prompt, hidden: torch.Tensor, first_token: int) -> None:
        # h comes back on the target's output device: its last one when it is split over several.
        hidden = hidden.to(self.device)
        self.state = self.draft.new_state(device=self.device)
        self.stream, self.last_feature = self.draft.prompt_stream(
            prompt.input_ids[0].to(target.device), prompt.media_spans, hidden, first_token, compress=not self.eagle)
        self.last_hidden = hidden[-1]

    def propose(self, n: int, context: list[int], config: GenerationConfig, generator: torch.Generator,
                cursor: RulesCursor | None):
        """n draft tokens after the generated ``context``; ``cursor``: the rules' state after it (None
        without rules), which the draft's rows are processed with."""
        propose = _propose_chain if self.eagle else _propose_block
        return propose(self.draft, self.state, self.stream, self.last_feature, self.last_hidden, n, config, generator,
                       cursor)

    def _slot_logits(self, depth: int, base: RulesCursor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One semi-autoregressive pass: the draft's logits for ``depth`` slots [depth, Vd] with the
        prefix's repetition penalty applied to every row in one go (``base`` None: no rules), and the
        draft columns' target ids (None for a full-vocabulary draft)."""
        draft = self.draft
        logits = draft.draft_logits(draft.propose(self.state, self.stream, self.last_feature, self.last_hidden,
                                                  depth)).float()
        column_of = draft.target_columns()
        if base is not None:
            base.penalise_seen_(logits, column_of)
        return logits, column_of

    def propose_tree(self, depth: int, base: RulesCursor | None, config: GenerationConfig) -> DraftTree:
        """Greedy: one semi-autoregressive pass, read as a tree: each slot's best tokens, the target's rules
        (``base``: their state after the generated tokens, None without rules) applied along each
        branch's own path (see :func:`flash.engine.tree.build_tree`).

        Each slot's row is processed once (the prefix's penalty, its logsumexp, its top entries);
        a branch's own path changes a few scores (the penalty for its new tokens, its n-gram bans),
        which :func:`flash.engine.tree.best_after_changes` applies to the top entries in Python. Only where
        those cannot decide is the row processed for that branch (the same ranking either way).
        """
        draft = self.draft
        scores, column_of = self._slot_logits(depth, base)
        width = min(scores.shape[-1], config.tree_branch + _TREE_SPARE)
        top_scores, top_columns = (part.tolist() for part in scores.topk(width))
        log_norms = scores.logsumexp(-1).tolist()
        token_of, column_lookup = draft.vocab_lookup()

        def columns_of(tokens: list[int]) -> list[int]:
            """Target token ids -> the draft vocabulary's columns (tokens it lacks are dropped)."""
            if column_lookup is None:
                return tokens
            return [c for c in (column_lookup.get(t, -1) for t in tokens) if c >= 0]

        def expand(level: int, path: list[int]) -> tuple[list[int], list[float]]:
            row, changed = level - 1, {}
            if base is not None:  # the rest of the rules for this branch's own path: a few scores change
                penalised, banned = (columns_of(tokens) for tokens in base.path_changes(path))
                if penalised or banned:
                    old = scores[row, penalised + banned].tolist()
                    lowered, removed = old[: len(penalised)], old[len(penalised) :]
                    changed = {c: (s, base.rules.penalised(s)) for c, s in zip(penalised, lowered, strict=True)}
                    changed.update({c: (s, -math.inf) for c, s in zip(banned, removed, strict=True)})
            found = best_after_changes(list(zip(top_scores[row], top_columns[row], strict=True)), log_norms[row],
                                       changed, config.tree_branch, exhaustive=width == scores.shape[-1])
            if found is None:  # the top entries cannot decide: process this branch's whole row
                full = scores[row] if base is None else base.finish_after_(scores[row].clone(), path, column_of)
                top = full.softmax(-1).topk(config.tree_branch)
                keep = top.values > 0  # a token the rules ban has probability 0: never a candidate
                return draft.to_target_ids(top.indices[keep]).tolist(), top.values[keep].tolist()
            columns, probs = found
            return [token_of[c] for c in columns], probs

        return build_tree(expand, depth, config.tree_nodes, config.tree_min_prob, config.tree_branch)

    def propose_sampled_tree(self, depth: int, base: RulesCursor | None, config: GenerationConfig,
                             generator: torch.Generator) -> tuple[DraftTree, dict[int, torch.Tensor]]:
        """Sampling: one semi-autoregressive pass read as a tree of a fixed shape whose tokens are drawn.

        The root's ``tree_branch`` children are drawn from slot 1's q without replacement (fewer where
        q holds fewer tokens); under the first of them a chain (one draw per slot) fills the rest of
        ``tree_nodes``. The shape is fixed before any draw: whether a node is proposed must not depend
        on its own token (a best-first pick by its probability would), or
        :func:`flash.engine.verification.sibling_verify` would not be exact. Returns the tree and, per parent
        (-1 = the root), the q (target vocabulary) its children were drawn from.
        """
        draft = self.draft
        logits, column_of = self._slot_logits(depth, base)
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        q_of: dict[int, torch.Tensor] = {}
        parent, path, joint = -1, [], 1.0
        for level in range(1, depth + 1):
            row = logits[level - 1] if base is None else base.finish_after_(logits[level - 1].clone(), path, column_of)
            if not torch.isfinite(row).any():
                break  # the rules ban every token the draft knows
            q = logits_to_probs(row[None], config.temperature, config.top_p)[0]
            joint *= float(q.max())  # the chain's confidence cut: it reads q, never a drawn token
            if config.min_draft_prob and joint < config.min_draft_prob:
                break
            room = config.tree_nodes - len(tokens)
            count = min(config.tree_branch if level == 1 else 1, room)
            drawn = draw_siblings(q, count, generator)
            if not drawn:
                break
            q_of[parent] = draft.to_target_vocab(q[None], 0.0)[0]
            first = len(tokens)
            for column in drawn:
                tokens.append(int(draft.draft_to_target[column]))
                parents.append(parent)
                depths.append(level)
            parent, path = first, path + [tokens[first]]
        return DraftTree(tuple(tokens), tuple(parents), tuple(depths)), q_of

    def update(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Feed h of the verified tokens; ``next_ids`` are the tokens after each ([a+1])."""
        hidden = hidden.to(self.device)  # from the target's output device: [a+1, D], a few KB
        fused = self.draft.fuse_features(hidden, self.draft.embed(next_ids))
        self.stream, self.last_feature, self.last_hidden = fused[:-1], fused[-1], hidden[-1]


class _PromptLookupProposer:
    """Training-free prompt-lookup decoding: transformers' n-gram matcher proposes, our loop verifies."""

    def __init__(self, k: int, vocab_size: int) -> None:
        from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

        self.k, self.vocab_size = k, vocab_size
        self.lookup = PromptLookupCandidateGenerator(num_output_tokens=k, max_matching_ngram_size=3,
                                                     max_length=1 << 30)

    def start(self, target: TargetModel, prompt: Prompt, hidden: torch.Tensor, first_token: int) -> None:
        self.prompt_ids = prompt.input_ids[0].tolist()
        self.device = target.device

    def propose(self, n: int, context: list[int], config: GenerationConfig, generator: torch.Generator,
                cursor: RulesCursor | None):
        ids = torch.tensor([self.prompt_ids + context])
        found, _ = self.lookup.get_candidates(ids)
        draft_ids = found[0, ids.shape[1] :][:n].to(self.device)
        # The proposal is deterministic: q is a point mass on each proposed token.
        probs = None if config.greedy else torch.nn.functional.one_hot(draft_ids, self.vocab_size).float()
        return draft_ids, probs

    def update(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> None:
        pass


@torch.inference_mode()
def _speculative(target: TargetModel, prompt: Prompt, proposer, method: str,
                 config: GenerationConfig) -> Iterator[StepEvent]:
    device = target.device
    clock, out, generator, pre, token, event = _begin(target, prompt, method, config)
    yield event
    clock.resume()
    state = pre.state
    proposer.start(target, prompt, pre.hidden, token)
    # The rules' state after the generated tokens, grown as tokens are emitted (as in flash-tree).
    cursor = config.rules.cursor(out.generated) if config.rules.active else None

    while not out.done:
        # 1. Draft: never propose more than can still be emitted after the pending token.
        t0 = clock.now()
        n_draft = min(proposer.k, out.room - 1)
        if n_draft > 0:
            draft_ids, draft_probs = proposer.propose(n_draft, out.generated, config, generator, cursor)
        else:
            draft_ids, draft_probs = torch.empty(0, dtype=torch.long, device=device), None
        t1 = clock.now()

        # 2. Verify [pending, d_1..d_n] in one target forward; rules see each row's exact prefix.
        candidates = torch.cat([torch.tensor([token], device=device), draft_ids])
        cache_len = state.length
        logits, hidden = target.forward(state, candidates[None])
        if cursor is not None:  # in place: the prefix's penalty for every row, then row j's own drafts
            cursor.penalise_seen_(logits)
            drafted = draft_ids.tolist()
            for j in range(logits.shape[0]):
                cursor.finish_after_(logits[j], drafted[:j])

        # 3. Accept.
        if config.greedy:  # on the logits' device (a split target's last one): the drafts are a few ids
            accepted, next_token = greedy_verify(draft_ids.to(logits.device), logits)
        else:
            target_probs = logits_to_probs(logits, config.temperature, config.top_p)
            accepted, next_token = sampling_verify(draft_ids, draft_probs, target_probs, generator)

        # 4. Roll back: keep the pending token and the accepted drafts in the target cache.
        target.crop(state, cache_len + 1 + accepted)
        accepted_ids = draft_ids[:accepted]
        proposer.update(hidden[: accepted + 1], torch.cat([accepted_ids, torch.tensor([next_token], device=device)]))
        token = next_token

        # 5. Emit.
        emitted = accepted_ids.tolist() + [next_token]
        yield out.emit(emitted, accepted, int(draft_ids.shape[0]), t1 - t0, clock.now() - t1)
        clock.resume()
        if cursor is not None:
            cursor.extend(emitted)


def _target_choice(logits: torch.Tensor, cursor, config: GenerationConfig, generator: torch.Generator):
    """``choose(row, path)`` for :func:`flash.engine.tree.walk_tree`: the target's own token from its logits row
    after the rules (``cursor``: a :class:`RulesCursor` at the generated prefix, or None), chosen by
    :func:`_choose` exactly as the ``ar`` loop chooses it. ``logits`` is processed in place (the walk
    asks for each row at most once): the prefix's penalty for all rows in one go, then each asked
    row's own path (bit for bit what :meth:`LogitsRules.apply` gives that row)."""
    if cursor is not None:
        cursor.penalise_seen_(logits)

    def choose(row: int, path: list[int]) -> int:
        scores = logits[row]
        if cursor is not None:
            scores = cursor.finish_after_(scores, path)
        return _choose(scores, config, generator)

    return choose


def _sibling_check(logits: torch.Tensor, cursor, config: GenerationConfig, q_of: dict[int, torch.Tensor],
                   generator: torch.Generator):
    """``verify(row, parent, path, candidates)`` for :func:`flash.engine.tree.walk_sampled_tree`: the target's
    distribution at the row (rules with the row's own path, then temperature and top-p, as ``ar``
    samples from it) checked against the drawn siblings by :func:`sibling_verify`."""
    if cursor is not None:
        cursor.penalise_seen_(logits)

    def verify(row: int, parent: int, path: list[int], candidates: list[int]) -> tuple[int | None, int]:
        scores = logits[row]
        if cursor is not None:
            scores = cursor.finish_after_(scores, path)
        p = logits_to_probs(scores, config.temperature, config.top_p)
        if not candidates:  # a leaf (or no tree): the target's own draw, as ar draws it
            return None, int(sample(p, generator))
        return sibling_verify(candidates, q_of[parent], p, generator)

    return verify


@torch.inference_mode()
def _speculative_tree(target: TargetModel, prompt: Prompt, proposer: _DraftProposer,
                      config: GenerationConfig) -> Iterator[StepEvent]:
    """FLASH with a draft tree: one target pass checks every branch (EAGLE-2's verification).

    Greedy: every emitted token is the target's own argmax at its exact prefix; a draft node only
    saves the pass that would compute the next row (the tree is best-first, EAGLE-2's). Sampling:
    siblings are drawn from the draft without replacement and checked by recursive rejection
    sampling (:func:`flash.engine.verification.sibling_verify`), so each emitted token has the target's law
    at its exact prefix, and a wrong first sibling still leaves the others a chance.
    """
    device, rules = target.device, config.rules
    clock, out, generator, pre, token, event = _begin(target, prompt, "flash-tree", config)
    yield event
    clock.resume()
    state = pre.state
    proposer.start(target, prompt, pre.hidden, token)
    # The rules' state after the generated tokens, grown as tokens are emitted; drafting and the
    # walk only read it (paths are added per row), so one cursor serves the whole generation.
    cursor = rules.cursor(out.generated) if rules.active else None

    while not out.done:
        # 1. Draft a tree no deeper than what can still be emitted after the pending token.
        t0 = clock.now()
        depth = min(proposer.k, out.room - 1)
        q_of: dict[int, torch.Tensor] = {}
        if depth <= 0:
            tree = DraftTree((), (), ())
        elif config.greedy:
            tree = proposer.propose_tree(depth, cursor, config)
        else:
            tree, q_of = proposer.propose_sampled_tree(depth, cursor, config, generator)
        t1 = clock.now()

        # 2. Verify the root (pending token) and every draft node in one pass.
        cache_len = state.length
        ids = torch.tensor([[token, *tree.tokens]], device=device)
        if len(tree):
            mask, positions = tree_attention(tree, cache_len, device)
            logits, hidden = target.forward_tree(state, ids, mask, positions)
        else:
            logits, hidden = target.forward(state, ids)

        # 3. Accept: follow the target's own choices down the tree; each row sees its own path's prefix.
        if config.greedy:
            accepted, next_token = walk_tree(tree, _target_choice(logits, cursor, config, generator))
        else:
            accepted, next_token = walk_sampled_tree(tree, _sibling_check(logits, cursor, config, q_of, generator))

        # 4. Keep the root and the accepted path in the target cache; feed their h to the draft.
        target.keep(state, cache_len + 1, accepted)
        accepted_ids = [tree.tokens[i] for i in accepted]
        rows = torch.tensor([0, *(1 + i for i in accepted)], device=hidden.device)
        proposer.update(hidden[rows], torch.tensor(accepted_ids + [next_token], device=device))
        token = next_token

        # 5. Emit.
        yield out.emit(accepted_ids + [next_token], len(accepted), len(tree), t1 - t0, clock.now() - t1)
        clock.resume()
        if cursor is not None:
            cursor.extend(accepted_ids + [next_token])


def _draft_tokens(draft: FlashDraft, features: torch.Tensor, config: GenerationConfig, generator: torch.Generator,
                  cursor: RulesCursor | None, path: list[int],
                  joint: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Predicted features [n, D] -> draft token ids [n] (target vocabulary), their q [n, V], and ``joint``.

    The target's logits rules are applied to the draft's logits too (``cursor``: their state after the
    generated tokens, None without rules), row i with the prefix ``generated + path + d_1..d_{i-1}``
    (``path``: the tokens drafted before this call in the same step): the draft then proposes what the
    rule-processed target would pick (acceptance only; verification stays exact whatever the draft
    proposes). ``joint`` is the draft's confidence in the tokens proposed before these (1 at a step's
    start); the returned one includes the kept rows. Rows stop where it would fall below
    ``config.min_draft_prob``.
    """
    logits = draft.draft_logits(features).float()  # [n, Vd]
    if cursor is not None:
        # Rows stay over the draft's vocabulary: the rules act on its columns only (tested equal to
        # processing the full-vocabulary row), so no 49k-wide row is built per draft token.
        column_of = draft.target_columns()
        cursor.penalise_seen_(logits, column_of)  # the prefix's penalty for every row in one go
        ids, probs = [], []
        for i in range(logits.shape[0]):
            row = cursor.finish_after_(logits[i], path + ids, column_of)  # then row i's own path
            if not torch.isfinite(row).any():
                break  # the rules ban every token the draft knows: propose fewer tokens this step
            confidence = joint * float(row.softmax(-1).max())
            if config.min_draft_prob and confidence < config.min_draft_prob:
                break
            joint = confidence
            if config.greedy:
                pick = int(row.argmax())
            else:
                q = logits_to_probs(row[None], config.temperature, config.top_p)
                pick = int(sample(q, generator)[0])
                probs.append(draft.to_target_vocab(q, 0.0))
            ids.append(int(draft.draft_to_target[pick]))
        ids_t = torch.tensor(ids, dtype=torch.long, device=features.device)
        return ids_t, (torch.cat(probs) if probs else None), joint
    confidence = joint * logits.softmax(-1).amax(-1).cumprod(0)  # [n]
    if config.min_draft_prob:
        kept = int((confidence >= config.min_draft_prob).sum())  # non-increasing: a prefix
        logits, confidence = logits[:kept], confidence[:kept]
    joint = float(confidence[-1]) if confidence.numel() else joint
    if config.greedy:
        return draft.to_target_ids(logits.argmax(-1)), None, joint
    probs = logits_to_probs(logits, config.temperature, config.top_p)
    ids = sample(probs, generator)
    # q over the target vocabulary: zero outside the draft's
    return draft.to_target_ids(ids), draft.to_target_vocab(probs, 0.0), joint


def _propose_block(draft: FlashDraft, dstate: DraftState, stream, last_feature, last_hidden, n: int,
                   config: GenerationConfig, generator: torch.Generator, cursor: RulesCursor | None):
    """FLASH: one semi-autoregressive pass gives n draft tokens."""
    features = draft.propose(dstate, stream, last_feature, last_hidden, n)
    ids, probs, _ = _draft_tokens(draft, features, config, generator, cursor, [])
    return ids, probs


def _propose_chain(draft: FlashDraft, dstate: DraftState, stream, last_feature, last_hidden, n: int,
                   config: GenerationConfig, generator: torch.Generator, cursor: RulesCursor | None):
    """EAGLE: n one-token passes, each feeding back the draft's own predicted feature."""
    ids, probs = [], []
    exact_length, joint = None, 1.0
    for i in range(n):
        feature = draft.propose(dstate, stream, last_feature, last_hidden, 1)  # [1, D]
        if exact_length is None:
            exact_length = dstate.length  # entries past this are speculative: overwritten next step
        tok, q, joint = _draft_tokens(draft, feature, config, generator, cursor, [int(t) for t in ids], joint)
        if tok.numel() == 0:
            break
        ids.append(tok)
        probs.append(q)
        if i + 1 < n:
            stream = feature.new_zeros(0, feature.shape[-1])
            last_hidden = feature[0]
            last_feature = draft.fuse_features(feature[0], draft.embed(tok)[0])
    dstate.length = exact_length
    if not ids:
        return torch.empty(0, dtype=torch.long, device=last_hidden.device), None
    return torch.cat(ids), (None if probs[0] is None else torch.cat(probs))
