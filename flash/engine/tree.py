"""Draft trees (EAGLE-2 style): build, lay out for one target pass, walk.

A FLASH draft pass gives one distribution per slot (depth). A *chain* proposes each slot's top
token; a *tree* also proposes runner-up tokens, so one target pass checks several continuations
and keeps the longest one the target agrees with. Nodes are chosen best-first by their joint draft
probability (the product along their path), as EAGLE-2 ranks them.

Node 0 of a laid-out tree is the *root*: the pending token, which the target always accepts. Every
other node has a parent that comes before it. Pure functions of their inputs: no models here.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens as a tree under the root (the pending token, not stored here).

    ``parents[i]`` is the index of node i's parent among the drafts, -1 for a child of the root;
    parents come before their children. ``depths[i]`` is 1 for a child of the root.
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def path(self, node: int) -> list[int]:
        """Tokens from the root's child down to ``node`` (inclusive)."""
        out = []
        while node >= 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]


def build_tree(expand: Callable[[int, list[int]], tuple[list[int], list[float]]], max_depth: int,
               max_nodes: int, min_joint: float, branch: int) -> DraftTree:
    """Best-first tree of at most ``max_nodes`` draft tokens, each with joint probability >= ``min_joint``.

    ``expand(depth, path)`` gives the draft's candidate tokens for ``depth`` (1-based) after the
    draft tokens ``path`` and their probabilities, best first; up to ``branch`` of them become
    candidates. A node is added only after its parent, so the result is a valid tree.
    With ``branch == 1`` this is the chain cut at the joint confidence ``min_joint``.
    """
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    heap: list[tuple[float, int, int, list[int]]] = []  # (-joint, order, parent, path ending in the node)
    order = 0

    def push_children(parent: int, joint: float, path: list[int]) -> None:
        nonlocal order
        candidates, probs = expand(len(path) + 1, path)
        for token, prob in list(zip(candidates, probs, strict=True))[:branch]:
            if joint * prob >= min_joint:
                heapq.heappush(heap, (-joint * prob, order, parent, path + [token]))
                order += 1

    if max_depth > 0 and max_nodes > 0:
        push_children(-1, 1.0, [])
    while heap and len(tokens) < max_nodes:
        neg_joint, _, parent, path = heapq.heappop(heap)
        tokens.append(path[-1])
        parents.append(parent)
        depths.append(len(path))
        if len(path) < max_depth:
            push_children(len(tokens) - 1, -neg_joint, path)
    return DraftTree(tuple(tokens), tuple(parents), tuple(depths))


def best_after_changes(top: list[tuple[float, int]], log_norm: float, changed: dict[int, tuple[float, float]],
                       count: int, exhaustive: bool) -> tuple[list[int], list[float]] | None:
    """The ``count`` most probable entries of softmax(scores) after some scores changed, from the row's
    largest scores alone: (entries, best first; their probabilities), or None where those cannot decide.

    ``top`` holds the row's largest (score, entry) pairs, best first (every entry if ``exhaustive``);
    ``log_norm`` is the logsumexp of the unchanged row; ``changed`` maps entry -> (old score, new score),
    a new score of -inf removing the entry. Scores may only go down (a repetition penalty, a ban), so
    an entry outside ``top`` cannot outrank one that is still at or above the lowest score in ``top``;
    where fewer than ``count`` are, None (the caller processes the whole row). A draft tree's branches
    each change a few of one row's scores: this ranks them without a pass over the row per branch.
    """
    mass = 1.0 + sum(math.exp(new - log_norm) - math.exp(old - log_norm) for old, new in changed.values())
    if mass <= 1e-12:
        return None
    log_norm += math.log(mass)
    scored = sorted(((changed[entry][1] if entry in changed else score, entry) for score, entry in top), reverse=True)
    picked = [(score, entry) for score, entry in scored if score > -math.inf][:count]
    if not exhaustive and (len(picked) < count or picked[-1][0] < top[-1][0]):
        return None
    return [entry for _, entry in picked], [math.exp(score - log_norm) for score, _ in picked]


def tree_attention(tree: DraftTree, past: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and positions for one target pass over [root, drafts...] after ``past`` cached positions.

    Returns (mask [1+n, past+1+n] bool, True = may attend; positions [1+n]): every row sees the
    cache, the root, its ancestors and itself, at position ``past + depth`` (the root at ``past``).
    """
    n = len(tree)
    mask = torch.zeros(1 + n, past + 1 + n, dtype=torch.bool, device=device)
    mask[:, : past + 1] = True
    for i in range(n):
        row, node = 1 + i, i
        while node >= 0:
            mask[row, past + 1 + node] = True
            node = tree.parents[node]
    positions = torch.tensor([0, *tree.depths], device=device) + past
    return mask, positions


def walk_tree(tree: DraftTree, choose: Callable[[int, list[int]], int]) -> tuple[list[int], int]:
    """Follow the target's own choices down the tree.

    ``choose(row, path)`` is the target's token at laid-out row ``row`` (0 = the root, 1 + i = draft
    node i) after the accepted draft tokens ``path``: its argmax (greedy) or a sample from its
    distribution (sampling). It is called once per emitted token, in order, exactly as plain
    decoding would choose them; a draft node is accepted when the chosen token is one of the
    current node's children, so the tree only decides which rows' logits are already computed.
    Returns (accepted node indices, in order; the target's next token after them).
    """
    children: dict[tuple[int, int], int] = {}
    for i, (parent, token) in enumerate(zip(tree.parents, tree.tokens, strict=True)):
        children.setdefault((parent, token), i)
    accepted: list[int] = []
    node = -1
    while True:
        token = choose(node + 1, [tree.tokens[i] for i in accepted])
        child = children.get((node, token))
        if child is None:
            return accepted, token
        accepted.append(child)
        node = child


SiblingCheck = Callable[[int, int, list[int], list[int]], tuple[int | None, int]]


def walk_sampled_tree(tree: DraftTree, verify: SiblingCheck) -> tuple[list[int], int]:
    """Follow the target down a tree whose siblings were *drawn* from the draft (sampling).

    ``verify(row, parent, path, candidates)`` decides at laid-out row ``row`` (0 = the root, 1 + i =
    draft node i; ``parent`` is -1 or i) after the accepted draft tokens ``path`` among the node's
    children's tokens ``candidates`` (in the order they were drawn): (index of the accepted one,
    its token), or (None, the target's own token) -- :func:`flash.engine.verification.sibling_verify`.
    Returns (accepted node indices, in order; the target's next token after them).
    """
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(i)
    accepted: list[int] = []
    node = -1
    while True:
        kids = children.get(node, [])
        pick, token = verify(node + 1, node, [tree.tokens[i] for i in accepted], [tree.tokens[i] for i in kids])
        if pick is None:
            return accepted, token
        accepted.append(kids[pick])
        node = kids[pick]
