"""Decoding loops: plain autoregressive (``ar``), EAGLE-style (``eagle``), ``flash``, ``flash-tree`` and
prompt lookup (``pld``).

Every loop is a generator of :class:`~flash.engine.events.StepEvent`; the app, the CLI and the
benchmark consume only these events. One speculative step reads top to bottom: draft -> verify ->
accept -> roll back caches -> emit event. Step 0 is the prefill, which emits the target's first token.
What a step drafts comes from :mod:`flash.engine.proposers`, how it accepts from
:mod:`flash.engine.verification` (chains) and :mod:`flash.engine.tree` (trees).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from flash.draft import FlashDraft
from flash.engine.config import METHODS, GenerationConfig
from flash.engine.events import Clock, Emitter, StepEvent
from flash.engine.proposers import DraftProposer, PromptLookupProposer, Proposer
from flash.engine.sampling import choose_token
from flash.engine.tree import DraftTree, tree_attention, walk_sampled_tree, walk_tree
from flash.engine.verification import (
    greedy_verify,
    logits_to_probs,
    make_generator,
    sample,
    sampling_verify,
    sibling_verify,
)
from flash.targets.base import Prompt, TargetModel


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
        return _speculative(target, prompt, PromptLookupProposer(config.k or 8, target.vocab_size), method, config)
    if draft is None:
        raise ValueError(f"method '{method}' needs a draft model")
    k = config.k or draft.cfg.k
    if method in ("flash", "flash-tree"):
        k = min(k, draft.cfg.k)  # one slot per draft token (per tree depth)
    if method == "flash-tree":
        if not target.supports_tree:
            raise ValueError(f"this target ({target.name}) cannot verify draft trees; use 'flash'")
        return _speculative_tree(target, prompt, DraftProposer(draft, False, k), config)
    return _speculative(target, prompt, DraftProposer(draft, method == "eagle", k), method, config)


def _prefill(target: TargetModel, prompt: Prompt, config: GenerationConfig, clock: Clock, out: Emitter,
             generator: torch.Generator):
    """Step 0 of every loop: prefill the prompt and choose the target's first token."""
    t0 = clock.now()
    pre = target.prefill(prompt)
    token = choose_token(config.rules.apply(pre.last_logits[None], out.generated, 0)[0], config, generator)
    return pre, token, out.emit([token], 0, 0, 0.0, clock.now() - t0)


def _begin(target: TargetModel, prompt: Prompt, method: str, config: GenerationConfig):
    """What every loop starts with: its clock, emitter and generator, then the prefill (step 0).

    Returns (clock, emitter, generator, prefill output, the target's first token, step 0's event).
    """
    clock = Clock(target.device)
    out = Emitter(method, target, config, clock)
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
        token = choose_token(row, config, generator)
        yield out.emit([token], 0, 0, 0.0, clock.now() - t0)
        clock.resume()
        if cursor is not None:
            cursor.push(token)
    clock.resume()


@torch.inference_mode()
def _speculative(target: TargetModel, prompt: Prompt, proposer: Proposer, method: str,
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
    :func:`choose_token` exactly as the ``ar`` loop chooses it. ``logits`` is processed in place (the walk
    asks for each row at most once): the prefix's penalty for all rows in one go, then each asked
    row's own path (bit for bit what :meth:`LogitsRules.apply` gives that row)."""
    if cursor is not None:
        cursor.penalise_seen_(logits)

    def choose(row: int, path: list[int]) -> int:
        scores = logits[row]
        if cursor is not None:
            scores = cursor.finish_after_(scores, path)
        return choose_token(scores, config, generator)

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
def _speculative_tree(target: TargetModel, prompt: Prompt, proposer: DraftProposer,
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
