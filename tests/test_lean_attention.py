"""The in-place KV cache, grouped-KV SDPA and the lean forward give transformers' own numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from flash.cpu import cpu_kernels
from flash.cpu.fp16_linear import Fp16Linear, convert_linears
from flash.cpu.gqa_attention import gqa_sdpa_attention
from flash.cpu.lean_llama import LeanLlama, fp32_linear
from flash.engine.tree import DraftTree, tree_attention
from flash.targets.kv_cache import InPlaceLayer, in_place_cache


def tiny_llama(seed: int = 0, head_dim: int = 8, arch: str = "llama") -> LlamaForCausalLM | Qwen2ForCausalLM:
    """3 layers, 6 query heads over 2 KV heads; ``head_dim`` 64 reaches FLASH's C++ attention.
    ``arch="qwen2"``: the same shape as a Qwen2 (biases on q/k/v, an untied head; Qwen2.5's LM)."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=97, hidden_size=6 * head_dim, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False, rope_theta=1e6)).eval()
        with torch.no_grad():  # random init leaves biases at zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return model
    return LlamaForCausalLM(LlamaConfig(**shape)).eval()


ARCHS = ["llama", "qwen2"]


def run_steps(model, cache, steps):
    """Feed token blocks / crops through ``model`` with ``cache``: returns every block's logits."""
    out, length = [], 0
    for step in steps:
        if isinstance(step, int):  # a crop back to this length
            cache.crop(step - length)
            length = step
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([step]), past_key_values=cache, use_cache=True).logits
        out.append(logits)
        length += len(step)
    return out


# A prefill, one-token steps, verification blocks with crops (speculative decoding's pattern), and
# a block long enough to outgrow the first buffer.
STEPS = [list(range(1, 12)), [5], [6, 7, 8, 9, 10], 13, [20, 21, 22], 14, [30], list(range(40, 96)) * 6, [3]]


def test_in_place_cache_matches_dynamic_cache_through_crops_and_growth():
    model = tiny_llama()
    want = run_steps(model, DynamicCache(config=model.config), STEPS)
    cache = in_place_cache(model.config)
    got = run_steps(model, cache, STEPS)
    assert all(isinstance(layer, InPlaceLayer) for layer in cache.layers)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 14 + 1 + 336 + 1
    buffer = cache.layers[0]._key_buffer
    assert buffer.shape[-2] >= cache.get_seq_length() > 256 + 11  # it grew past its first allocation
    # Crops move a length, not data: the view still points into the same buffer.
    cache.crop(-100)
    assert cache.layers[0].keys.data_ptr() == buffer.data_ptr() and cache.get_seq_length() == 252


class LeanModel:
    """A LeanLlama over ``model``'s weights, called like the model in :func:`run_steps`."""

    def __init__(self, model: LlamaForCausalLM, linear=None, fused_ops: bool = False) -> None:
        self.model, self.config = model, model.config
        self.lean = LeanLlama(model.model, linear or fp32_linear, fused_ops)

    def __call__(self, *, input_ids, past_key_values, use_cache=True, **inputs):
        hidden = self.lean(past_key_values, input_ids=input_ids, **inputs)
        return type("Out", (), {"logits": self.model.lm_head(hidden)})


# FLASH's C++ norms and rotary embedding (the default model's forward) where they build here.
FUSED_OPS = [False, pytest.param(True, marks=pytest.mark.skipif(not cpu_kernels.kernel_available(),
                                                                reason="FLASH's CPU kernels do not build here"))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused_ops", FUSED_OPS)
def test_lean_llama_matches_transformers_through_crops_and_growth(fused_ops, arch):
    model = tiny_llama(head_dim=64 if fused_ops else 8, arch=arch)
    want = run_steps(model, DynamicCache(config=model.config), STEPS)
    got = run_steps(LeanModel(model, fused_ops=fused_ops), in_place_cache(model.config), STEPS)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_llama_with_fp16_weights_equals_transformers_with_fp16_weights(arch):
    """Fusing q/k/v (and their biases) and gate/up changes no output column's arithmetic: the same
    numbers, bit for bit."""
    reference, source = tiny_llama(arch=arch), tiny_llama(arch=arch)
    convert_linears(reference.model.layers)
    want = run_steps(reference, in_place_cache(reference.config), STEPS)
    got = run_steps(LeanModel(source, Fp16Linear.from_weight), in_place_cache(source.config), STEPS)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused_ops", FUSED_OPS)
def test_lean_llama_tree_pass_equals_one_chain_per_branch(fused_ops, arch):
    model = tiny_llama(head_dim=64 if fused_ops else 8, arch=arch)
    lean = LeanLlama(model.model, fused_ops=fused_ops)
    prompt = torch.arange(1, 12)[None]
    tree = DraftTree(tokens=(5, 9, 7, 3), parents=(-1, -1, 0, 2), depths=(1, 1, 2, 3))
    cache = in_place_cache(model.config)
    lean(cache, input_ids=prompt)
    mask, positions = tree_attention(tree, 11)
    got = lean(cache, input_ids=torch.tensor([[40, *tree.tokens]]), attention_mask=mask[None, None],
               position_ids=positions[None])[0]
    for nodes in ([0, 2, 3], [1]):
        chain = DynamicCache(config=model.config)
        with torch.inference_mode():
            ids = torch.cat([prompt, torch.tensor([[40, *(tree.tokens[i] for i in nodes)]])], dim=1)
            want = model.model(input_ids=ids, past_key_values=chain, use_cache=True).last_hidden_state[0, 11:]
        torch.testing.assert_close(got[[0, *(1 + i for i in nodes)]], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.skipif(not cpu_kernels.kernel_available(), reason="FLASH's CPU kernels do not build here")
def test_default_models_forward_gives_a_tree_row_exactly_what_one_token_steps_give(arch):
    """The default model's forward (fp16 kernel, C++ norms, rotary and attention): each row of a tree
    pass is bit for bit the one-token step on its path, which keeps flash-tree's greedy text ar's."""
    model = tiny_llama(head_dim=64, arch=arch)
    lean = LeanLlama(model.model, Fp16Linear.from_weight, fused_ops=True)
    prompt = torch.arange(1, 12)[None]
    tree = DraftTree(tokens=(5, 9, 7, 3, 8), parents=(-1, -1, 0, 2, 1), depths=(1, 1, 2, 3, 2))
    cache = in_place_cache(model.config)
    lean(cache, input_ids=prompt)
    mask, positions = tree_attention(tree, 11)
    got = lean(cache, input_ids=torch.tensor([[40, *tree.tokens]]), attention_mask=mask[None, None],
               position_ids=positions[None])[0]
    for nodes in ([0, 2, 3], [1, 4]):
        steps = in_place_cache(model.config)
        lean(steps, input_ids=prompt)
        path = [40, *(tree.tokens[i] for i in nodes)]
        want = [lean(steps, input_ids=torch.tensor([[token]]))[0, 0] for token in path]
        assert torch.equal(got[[0, *(1 + i for i in nodes)]], torch.stack(want))
    # A chain's verification (causal, no mask) too: its rows are the one-token steps.
    block, steps = in_place_cache(model.config), in_place_cache(model.config)
    lean(block, input_ids=prompt)
    lean(steps, input_ids=prompt)
    together = lean(block, input_ids=torch.tensor([[6, 2, 4]]))[0]
    assert torch.equal(together, torch.cat([lean(steps, input_ids=torch.tensor([[t]]))[0] for t in (6, 2, 4)]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused_ops", FUSED_OPS)
def test_lean_llama_left_padded_batch_equals_each_row_alone(fused_ops, arch):
    """The batched distillation's pattern: left-padded prompts with a 2D mask, then one-token steps."""
    model = tiny_llama(head_dim=64 if fused_ops else 8, arch=arch)
    lean = LeanLlama(model.model, fused_ops=fused_ops)
    prompts = [list(range(3, 12)), list(range(20, 25))]
    steps = [[7, 8], [9, 10]]  # two decoding steps, one token per row each
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = in_place_cache(model.config)
    batch = [lean(cache, input_ids=ids, attention_mask=mask, position_ids=positions)]
    for step in steps:
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        batch.append(lean(cache, input_ids=torch.tensor(step)[:, None], attention_mask=mask, position_ids=positions))
    assert all(torch.isfinite(out).all() for out in batch)  # pad rows included
    for row, prompt in enumerate(prompts):
        alone = in_place_cache(model.config)
        want = [lean(alone, input_ids=torch.tensor([prompt]))[0]]
        want += [lean(alone, input_ids=torch.tensor([[step[row]]]))[0] for step in steps]
        torch.testing.assert_close(batch[0][row, width - len(prompt):], want[0], rtol=0, atol=1e-5)
        for got, expected in zip(batch[1:], want[1:], strict=True):
            torch.testing.assert_close(got[row], expected, rtol=0, atol=1e-5)


def test_lean_llama_refuses_layers_it_does_not_run():
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, attention_bias=True)
    with pytest.raises(ValueError, match="biases on q/k/v only"):  # o_proj has a bias too
        LeanLlama(LlamaForCausalLM(cfg).model)
    sliding = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True, sliding_window=16)
    with pytest.raises(ValueError, match="sliding window"):
        LeanLlama(Qwen2ForCausalLM(sliding).model)


@pytest.mark.parametrize(("q_len", "kv_len", "masked"), [(1, 9, False), (4, 4, False), (3, 10, False), (3, 10, True)])
def test_gqa_sdpa_equals_repeated_heads(q_len, kv_len, masked):
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 6, q_len, 8), torch.randn(1, 2, kv_len, 8), torch.randn(1, 2, kv_len, 8)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)  # bottom-right aligned
    mask = causal.clone()
    if masked:
        mask[:, 0] = False  # e.g. a padded first position
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=mask)
    module = torch.nn.Module()
    got, _ = gqa_sdpa_attention(module, query, key, value, mask[None, None] if masked else None)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_in_place_cache_drops_and_repeats_batch_rows_like_dynamic_cache():
    model = tiny_llama()
    prompt = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])

    def run(cache):
        with torch.inference_mode():
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
            model(input_ids=torch.tensor([[1], [2], [3], [4]]), past_key_values=cache, use_cache=True)
            cache.batch_select_indices(torch.tensor([1, 2]))  # a finished row leaves
            return model(input_ids=torch.tensor([[5, 6], [7, 8]]), past_key_values=cache, use_cache=True).logits

    torch.testing.assert_close(run(in_place_cache(model.config)), run(DynamicCache(config=model.config)),
                               rtol=0, atol=1e-5)
