"""Draft proposers: what a speculative step verifies.

A proposer has the three methods the chain loop calls (:class:`Proposer`): ``start`` once after the
prefill, ``propose`` for each step's draft tokens and ``update`` with the hidden states of what the
target accepted. :class:`DraftProposer` runs the trained FLASH draft (one semi-autoregressive pass per
step) or, as ``eagle``, the same draft one token per pass, and proposes the trees ``flash-tree``
verifies; :class:`PromptLookupProposer` is training-free n-gram lookup in the prompt (``pld``)."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from flash.draft import DraftState, FlashDraft
from flash.engine.config import GenerationConfig
from flash.engine.logits_rules import RulesCursor
from flash.engine.tree import DraftTree, best_after_changes, build_tree
from flash.engine.verification import draw_siblings, logits_to_probs, sample
from flash.targets.base import Prompt, TargetModel

#: Entries beyond the branching factor that a draft tree reads from each slot's row: enough for the
#: few scores a branch's path lowers (its new tokens' penalty, its bans) to leave the top decided.
_TREE_SPARE = 8


class Proposer(Protocol):
    """What the chain loop (``flash``, ``eagle``, ``pld``) needs from a proposer."""

    k: int  # at most this many draft tokens per step

    def start(self, target: TargetModel, prompt: Prompt, hidden: torch.Tensor, first_token: int) -> None:
        """After the prefill: ``hidden`` is h over the prompt [L, D], ``first_token`` the target's first token."""

    def propose(self, n: int, context: list[int], config: GenerationConfig, generator: torch.Generator,
                cursor: RulesCursor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` draft ids [n] after the generated ``context`` and their q over the target vocabulary
        [n, V] (None when greedy); ``cursor``: the rules' state after ``context`` (None without rules)."""

    def update(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> None:
        """h of the verified tokens [a+1, D]; ``next_ids`` [a+1] the token after each."""


class DraftProposer:
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
        width = min(scores.shape[-1], config.tree.branch + _TREE_SPARE)
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
                                       changed, config.tree.branch, exhaustive=width == scores.shape[-1])
            if found is None:  # the top entries cannot decide: process this branch's whole row
                full = scores[row] if base is None else base.finish_after_(scores[row].clone(), path, column_of)
                top = full.softmax(-1).topk(config.tree.branch)
                keep = top.values > 0  # a token the rules ban has probability 0: never a candidate
                return draft.to_target_ids(top.indices[keep]).tolist(), top.values[keep].tolist()
            columns, probs = found
            return [token_of[c] for c in columns], probs

        return build_tree(expand, depth, config.tree.nodes, config.tree.min_prob, config.tree.branch)

    def propose_sampled_tree(self, depth: int, base: RulesCursor | None, config: GenerationConfig,
                             generator: torch.Generator) -> tuple[DraftTree, dict[int, torch.Tensor]]:
        """Sampling: one semi-autoregressive pass read as a tree of a fixed shape whose tokens are drawn.

        The root's ``tree.branch`` children are drawn from slot 1's q without replacement (fewer where
        q holds fewer tokens); under the first of them a chain (one draw per slot) fills the rest of
        ``tree.nodes``. The shape is fixed before any draw: whether a node is proposed must not depend
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
            room = config.tree.nodes - len(tokens)
            count = min(config.tree.branch if level == 1 else 1, room)
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


class PromptLookupProposer:
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
