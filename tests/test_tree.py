"""Draft trees: the pure tree math, the target's tree pass and cache compaction, and ``flash-tree``
decoding against plain decoding, greedy and seeded sampling (the default target, real photos and
videos). The law of ``flash-tree``'s samples is tested with the other methods' in test_decoding.py."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import assert_tree_pass_equals_chains
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoding import ArReference, ScriptedDraft, assert_same_tokens, greedy, run_events

from flash.engine import GenerationConfig, TreeConfig, collect, generate
from flash.engine.tree import DraftTree, best_after_changes, build_tree, tree_attention, walk_tree
from flash.targets.kv_cache import in_place_cache, keep_positions

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ar_reference() -> ArReference:
    return ArReference()


@pytest.fixture(scope="module")
def media(photos, videos):
    return lambda name: {**photos, **videos}[name]


# --- the pure tree math ----------------------------------------------------------------------------


def random_expander(seed: int, vocab: int = 6):
    """expand(depth, path) -> a fixed random distribution per (depth, path), best first."""
    memo = {}

    def expand(depth, path):
        key = (depth, tuple(path))
        if key not in memo:
            rng = random.Random(hash((seed, key)))
            weights = [rng.random() ** 3 for _ in range(vocab)]
            probs = sorted(((w / sum(weights), t) for t, w in enumerate(weights)), reverse=True)
            memo[key] = ([t for _, t in probs], [p for p, _ in probs])
        return memo[key]

    return expand


def joint(expand, path):
    p = 1.0
    for depth in range(1, len(path) + 1):
        tokens, probs = expand(depth, path[: depth - 1])
        p *= probs[tokens.index(path[depth - 1])]
    return p


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("max_nodes,branch,min_joint", [(1, 1, 0.0), (4, 2, 0.02), (8, 3, 0.0), (12, 2, 0.05)])
def test_build_tree_is_the_best_first_tree(seed, max_nodes, branch, min_joint):
    expand = random_expander(seed)
    tree = build_tree(expand, 4, max_nodes, min_joint, branch)
    assert len(tree) <= max_nodes
    paths = [tuple(tree.path(i)) for i in range(len(tree))]
    assert len(set(paths)) == len(paths)  # no node twice
    for i, (parent, depth) in enumerate(zip(tree.parents, tree.depths, strict=True)):
        assert parent < i and depth == len(paths[i]) <= 4
        assert depth == 1 if parent < 0 else tree.depths[parent] == depth - 1
        tokens, _ = expand(depth, list(paths[i][:-1]))
        assert paths[i][-1] in tokens[:branch]
        assert joint(expand, list(paths[i])) >= min_joint
    # Best first: every candidate left out (a child, within the branch, of a node in the tree or
    # of the root) is no more likely than the least likely node taken, or the tree is full.
    taken = [joint(expand, list(p)) for p in paths]
    for parent_path in [()] + paths:
        if len(parent_path) == 4:
            continue
        tokens, _ = expand(len(parent_path) + 1, list(parent_path))
        for token in tokens[:branch]:
            child = parent_path + (token,)
            if child not in paths and joint(expand, list(child)) >= min_joint:
                assert len(tree) == max_nodes and joint(expand, list(child)) <= min(taken) + 1e-12


def test_build_tree_with_one_branch_is_the_chain_cut_at_the_joint_confidence():
    expand = random_expander(3)
    chain, p = [], 1.0
    for depth in range(1, 5):
        tokens, probs = expand(depth, chain)
        if p * probs[0] < 0.05:
            break
        chain.append(tokens[0])
        p *= probs[0]
    tree = build_tree(expand, 4, 4, 0.05, 1)
    assert list(tree.tokens) == chain and list(tree.parents) == list(range(-1, len(chain) - 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-40, 40), min_size=3, max_size=30), st.integers(1, 30), st.integers(1, 3),
       st.lists(st.tuples(st.integers(0, 29), st.booleans()), max_size=6))
def test_best_after_changes_ranks_as_processing_the_whole_row(scores, width, count, edits):
    """Lowered scores and bans applied to the top entries alone give the whole row's softmax top,
    or None; never a wrong answer."""
    row = torch.tensor(scores, dtype=torch.float64) / 4  # quarter steps: ties happen
    width = min(width, row.numel())
    changed = {}
    for entry, ban in edits:
        if entry < row.numel():
            old = float(row[entry])
            changed[entry] = (old, -math.inf if ban else (old * 1.2 if old < 0 else old / 1.2))
    top = row.topk(width)
    top = list(zip(top.values.tolist(), top.indices.tolist(), strict=True))
    found = best_after_changes(top, float(row.logsumexp(-1)), changed, count, exhaustive=width == row.numel())
    full = row.clone()
    for entry, (_, new) in changed.items():
        full[entry] = new
    probs = full.softmax(-1)
    if width == row.numel() and bool(torch.isfinite(full).any()):
        assert found is not None  # every entry known: always decided (unless every entry is banned)
    if found is None:
        return
    entries, got = found
    assert len(entries) == min(count, int((probs > 0).sum()))
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), probs[entries])
    # Ties aside, these are the best entries: none left out is more probable than the last one taken.
    left_out = [p for i, p in enumerate(probs.tolist()) if i not in entries]
    assert not entries or max(left_out, default=0.0) <= got[-1] * (1 + 1e-9)
    assert got == sorted(got, reverse=True)


def test_tree_attention_sees_the_cache_the_ancestors_and_itself():
    #      root - a(0) - c(2) - d(3)
    #           \ b(1) - e(4)
    tree = DraftTree(tokens=(10, 11, 12, 13, 14), parents=(-1, -1, 0, 2, 1), depths=(1, 1, 2, 3, 2))
    mask, positions = tree_attention(tree, past=3)
    assert positions.tolist() == [3, 4, 4, 5, 6, 5]
    sees = {row: [j - 3 for j in range(3, 9) if mask[row, j]] for row in range(6)}
    assert mask[:, :4].all()  # the cache and the root
    assert sees == {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 3, 4], 5: [0, 2, 5]}


def test_walk_tree_follows_the_target_and_returns_its_next_token():
    tree = DraftTree(tokens=(10, 11, 12, 13, 14), parents=(-1, -1, 0, 2, 1), depths=(1, 1, 2, 3, 2))
    target_path = {(): 11, (11,): 14, (11, 14): 99}  # root -> b -> e -> the target's own 99
    calls = []

    def choose(row, path):
        calls.append((row, tuple(path)))
        return target_path[tuple(path)]

    assert walk_tree(tree, choose) == ([1, 4], 99)
    assert calls == [(0, ()), (2, (11,)), (5, (11, 14))]
    assert walk_tree(DraftTree((), (), ()), lambda row, path: 7) == ([], 7)


# --- the target's tree pass and the cache compaction --------------------------------------------


@pytest.mark.parametrize("in_place", [True, False])
def test_keep_positions_compacts_every_layer(in_place):
    from transformers import DynamicCache, LlamaConfig

    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                         intermediate_size=32, vocab_size=10)
    cache = in_place_cache(config) if in_place else DynamicCache(config=config)
    keys = torch.arange(9.0).view(1, 1, 9, 1).expand(1, 1, 9, 8).contiguous()
    for layer in range(2):
        cache.update(keys + layer, -keys, layer)
    keep_positions(cache, 3, [0, 1, 3, 5])  # positions 3 and 4 stay, 6 and 8 move to 5 and 6
    for layer in range(2):
        assert cache.layers[layer].keys[0, 0, :, 0].tolist() == [v + layer for v in [0, 1, 2, 3, 4, 6, 8]]
        assert cache.layers[layer].values[0, 0, :, 0].tolist() == [-v for v in [0, 1, 2, 3, 4, 6, 8]]
    assert cache.get_seq_length() == 7
    keep_positions(cache, 4, [0, 1])  # already in place: a crop
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [v + 1 for v in [0, 1, 2, 3, 4, 6]]
    keep_positions(cache, 2, [])  # nothing accepted after position 2
    assert cache.get_seq_length() == 2 and cache.layers[0].values[0, 0, :, 0].tolist() == [0, -1]


def test_tree_pass_equals_one_chain_pass_per_branch_and_keep_leaves_a_chain_cache(smollm2_target, photos):
    target = smollm2_target
    prompt = target.build_prompt(photos["coffee"], "Describe this image in detail.")
    tree = DraftTree(tokens=(578, 6187, 2444, 30, 282), parents=(-1, -1, 0, 2, 1), depths=(1, 1, 2, 3, 2))
    root = 1062
    pre = target.prefill(prompt)
    past = pre.state.length
    mask, positions = tree_attention(tree, past)
    logits, hidden = target.forward_tree(pre.state, torch.tensor([[root, *tree.tokens]]), mask, positions)
    for leaf in (3, 4):  # each root-to-leaf branch, as a plain chain on a fresh cache
        nodes = [leaf]
        while tree.parents[nodes[-1]] >= 0:
            nodes.append(tree.parents[nodes[-1]])
        nodes = nodes[::-1]
        chain = target.prefill(prompt)
        chain_logits, _ = target.forward(chain.state, torch.tensor([[root, *(tree.tokens[i] for i in nodes)]]))
        rows = [0, *(1 + i for i in nodes)]
        torch.testing.assert_close(logits[rows], chain_logits, atol=2e-3, rtol=0)
    # Keep the branch root -> a -> c; the next token's logits then match the chain's.
    target.keep(pre.state, past + 1, [0, 2])
    assert pre.state.length == past + 3
    next_logits, _ = target.forward(pre.state, torch.tensor([[17]]))
    chain = target.prefill(prompt)
    expected, _ = target.forward(chain.state, torch.tensor([[root, tree.tokens[0], tree.tokens[2], 17]]))
    torch.testing.assert_close(next_logits[0], expected[-1], atol=2e-3, rtol=0)


# --- flash-tree decoding ------------------------------------------------------------------------


class RunnerUpDraft(ScriptedDraft):
    """A scripted draft whose mistakes keep the right token as a close runner-up (a tree catches it)."""

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        logits = super().draft_logits(features)
        first = self._first
        for slot in range(logits.shape[0]):
            if first + slot in self.wrong_at:  # the right token, one logit behind the wrong one
                logits[slot, self.script[first + slot] if first + slot < len(self.script) else 0] = 19.0
        return logits

    def propose(self, state, stream, last_feature, last_hidden, num_slots):
        features = super().propose(state, stream, last_feature, last_hidden, num_slots)
        self._first = state.length - 1 - self._origin + 1
        return features


@pytest.mark.parametrize("media_name,wrong_at", [("coffee", {2, 5, 6, 11}), ("cat-pan-4", {1, 8, 9, 15})])
def test_flash_tree_is_exact_and_catches_the_chains_mistakes(smollm2_target, media, ar_reference, make_draft,
                                                             media_name, wrong_at):
    config = GenerationConfig(max_new_tokens=24, rules=smollm2_target.logits_rules(),
                              tree=TreeConfig(nodes=8, branch=2, min_prob=0.01))
    prompt, expected = ar_reference(smollm2_target, media(media_name), None, greedy(smollm2_target))
    results = {}
    for method in ("flash", "flash-tree"):
        draft = make_draft(smollm2_target, k=4, num_latents=8, cls=RunnerUpDraft, script=expected, wrong_at=wrong_at)
        events = run_events(smollm2_target, prompt, method, draft, config) if method == "flash" else \
            list(generate(smollm2_target, prompt, method, draft, config))
        results[method] = collect(events)
        assert_same_tokens(smollm2_target, prompt, config.rules, expected, results[method].tokens, method)
    # The chain stops at every mistake; the tree also holds the runner-up, so it needs fewer passes.
    assert results["flash-tree"].accepted > results["flash"].accepted
    assert results["flash-tree"].steps < results["flash"].steps


@pytest.mark.parametrize("media_name", ["chelsea", "cat-pan-4"])
def test_flash_tree_with_a_random_draft_matches_ar(smollm2_target, media, ar_reference, make_draft, media_name):
    config = greedy(smollm2_target)
    prompt, expected = ar_reference(smollm2_target, media(media_name), None, config)
    draft = make_draft(smollm2_target, k=4, num_latents=8, seed=7)
    tree_config = GenerationConfig(max_new_tokens=config.max_new_tokens, rules=config.rules,
                                   tree=TreeConfig(nodes=6, branch=3, min_prob=0.0))
    result = collect(generate(smollm2_target, prompt, "flash-tree", draft, tree_config))
    assert_same_tokens(smollm2_target, prompt, config.rules, expected, result.tokens, "flash-tree")


@pytest.mark.parametrize("media_name", ["coffee", "cat-pan-4"])
def test_sampled_flash_tree_drafts_a_fixed_shape(smollm2_target, media, make_draft, media_name):
    """Sampling: the tree's shape is fixed before its tokens are drawn (``sibling_verify`` is exact
    only then: whether a node is proposed must not depend on its token), so every step with room
    proposes ``tree.nodes`` drafts (the root's two siblings, then a chain under the first), and
    fewer only where the request's end leaves no room (or where q has fewer tokens than siblings: not
    here, without top-p). The law itself: ``test_decoding.py``."""
    config = GenerationConfig(max_new_tokens=24, temperature=0.8, top_p=1.0, seed=5,
                              rules=smollm2_target.logits_rules(), tree=TreeConfig(nodes=4, branch=2))
    item = media(media_name)
    prompt = smollm2_target.build_prompt(item, smollm2_target.default_prompt(item))
    draft = make_draft(smollm2_target, k=4, num_latents=8, seed=7)
    events = list(generate(smollm2_target, prompt, "flash-tree", draft, config))
    steps = [e for e in events if e.step > 0]
    for e in steps:
        room = config.max_new_tokens - (e.total_tokens - len(e.tokens)) - 1  # drafts this step could hold
        assert e.proposed == (min(config.tree.nodes, 1 + room) if room > 0 else 0), e
    assert sum(e.accepted for e in steps) < sum(e.proposed for e in steps)  # a random draft: rejections
    again = collect(generate(smollm2_target, prompt, "flash-tree", draft, config))
    assert again.tokens == collect(events).tokens  # seeded: the drafts' draws and the checks repeat


@pytest.mark.parametrize("target_fixture", ["tiny_llava", "tiny_qwen"])
def test_hf_targets_verify_trees_exactly(request, photos, make_draft, target_fixture):
    target = request.getfixturevalue(target_fixture)
    assert target.supports_tree
    prompt = target.build_prompt(photos["coffee"], "Describe this image.")
    config = GenerationConfig(max_new_tokens=16)
    expected = collect(generate(target, prompt, "ar", None, config)).tokens
    tree_config = GenerationConfig(max_new_tokens=16, tree=TreeConfig(nodes=6, branch=3, min_prob=0.0))
    result = collect(generate(target, prompt, "flash-tree", make_draft(target, seed=3), tree_config))
    assert_same_tokens(target, prompt, config.rules, expected, result.tokens, f"{target_fixture} flash-tree")
    # A random draft is rarely right; also check the tree pass itself against one chain per branch.
    assert_tree_pass_equals_chains(target, prompt)
