"""fp16-weight linear layers (FLASH's kernel, fbgemm's as the fallback): the kernels' math, the kernel's
build, and the default target / shipped draft on them."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from flash.cpu import cpu_kernels
from flash.cpu.fp16_linear import Fp16Linear, convert_linears, fbgemm_fp16_available, fp16_gemm_available
from flash.cpu.rope import apply_rope, rope_tables
from flash.engine import GenerationConfig, collect, generate

pytestmark = pytest.mark.skipif(not fp16_gemm_available(), reason="this torch build has no fp16 GEMM")


def _kernel_can_build() -> bool:
    try:
        cpu_kernels._check_cpu()
    except cpu_kernels.KernelBuildError:
        return False
    return shutil.which("c++") is not None


needs_kernel = pytest.mark.skipif(not _kernel_can_build(), reason="needs x86-64 Linux with AVX2/FMA/F16C and c++")


@needs_kernel
def test_kernel_builds_and_is_what_fp16_linear_runs():
    assert cpu_kernels.kernel_available()
    assert Fp16Linear(torch.nn.Linear(8, 4)).backend == "flash"


@pytest.fixture(params=["avx512", "avx2"])
def gemm_path(request, monkeypatch) -> str:
    """Each of the GEMM's paths in turn: AVX-512 (where the CPU has it) and AVX2."""
    if request.param == "avx2":
        monkeypatch.setenv(cpu_kernels.NO_AVX512_ENV, "1")
    elif not cpu_kernels.has_avx512():
        pytest.skip("this CPU has no AVX-512")
    return request.param


@needs_kernel
@pytest.mark.parametrize("n, k", [(1, 1), (16, 7), (33, 576), (100, 1536)])
def test_kernel_is_fp32_math_on_fp16_weights(n, k, gemm_path):
    torch.manual_seed(n + k)
    weight = torch.randn(n, k)
    for m in (1, 2, 5, 6, 7, 13, 40):
        x = torch.randn(m, k)
        got = cpu_kernels.linear(x, cpu_kernels.pack(weight), n)
        ref = (x.double() @ weight.half().double().T).float()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_kernel
def test_kernel_rows_do_not_depend_on_the_other_rows_or_threads(gemm_path):
    """Bit for bit: what makes a verification pass compute exactly what one-token steps compute
    (passes of more than 12 rows, prefills, convert each weight block once; fewer stream them)."""
    torch.manual_seed(0)
    weight, x = torch.randn(50, 96), torch.randn(40, 96)
    packed = cpu_kernels.pack(weight)
    together = cpu_kernels.linear(x, packed, 50)
    for start, stop in ((0, 1), (3, 4), (2, 7), (5, 13), (6, 12), (13, 40), (0, 12)):
        assert torch.equal(cpu_kernels.linear(x[start:stop], packed, 50), together[start:stop])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_kernels.linear(x, packed, 50), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.skipif(not cpu_kernels.has_avx512(), reason="this CPU has no AVX-512")
@pytest.mark.parametrize("n", [1, 15, 16, 17, 32, 33, 48, 50, 100])
def test_avx512_path_gives_the_avx2_paths_floats(n, monkeypatch):
    """Bit for bit, at decoding (streamed: up to 12 rows in one chunk) and prefill row counts
    (blocks converted in pairs; an odd or partial last block alone): a draft verification, and outputs,
    are the same whichever path a CPU takes."""
    torch.manual_seed(n)
    for k in (1, 7, 130):
        packed = cpu_kernels.pack(torch.randn(n, k))
        for m in (1, 5, 8, 12, 13, 17, 29, 40):
            x = torch.randn(m, k)
            wide = cpu_kernels.linear(x, packed, n)
            monkeypatch.setenv(cpu_kernels.NO_AVX512_ENV, "1")
            narrow = cpu_kernels.linear(x, packed, n)
            monkeypatch.delenv(cpu_kernels.NO_AVX512_ENV)
            assert torch.equal(wide, narrow), (n, k, m)


@needs_kernel
def test_kernel_takes_any_leading_shape_and_refuses_wrong_input():
    packed = cpu_kernels.pack(torch.randn(20, 8))
    x = torch.randn(2, 3, 8)
    flat = cpu_kernels.linear(x.reshape(6, 8), packed, 20)
    assert torch.equal(cpu_kernels.linear(x, packed, 20), flat.view(2, 3, 20))
    assert torch.equal(cpu_kernels.linear(x[:, 0], packed, 20), cpu_kernels.linear(x[:, :1], packed, 20)[:, 0])
    assert cpu_kernels.linear(x.transpose(0, 1), packed, 20).shape == (3, 2, 20)  # non-contiguous is fine
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.linear(x.double(), packed, 20)
    with pytest.raises(RuntimeError, match="shapes"):
        cpu_kernels.linear(torch.randn(2, 9), packed, 20)


@needs_kernel
@pytest.mark.parametrize("d", [1, 8, 37, 576])
def test_fused_rms_norm_is_torchs_up_to_rounding_row_by_row(d):
    torch.manual_seed(d)
    x, weight = torch.randn(2, 7, d) * 3, torch.randn(d)
    got = cpu_kernels.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (d,), weight, 1e-5), rtol=2e-6, atol=1e-6)
    for row in range(7):  # a row's result does not depend on the other rows in the call
        assert torch.equal(cpu_kernels.rms_norm(x[:, row : row + 1], weight, 1e-5), got[:, row : row + 1])
    assert torch.equal(cpu_kernels.rms_norm(x.transpose(0, 1), weight, 1e-5), got.transpose(0, 1))
    assert cpu_kernels.rms_norm(torch.zeros(1, d), weight, 1e-5).abs().sum() == 0  # eps keeps it finite
    with pytest.raises(RuntimeError, match="weight must be float32"):
        cpu_kernels.rms_norm(x, torch.randn(d + 1), 1e-5)


@needs_kernel
@pytest.mark.parametrize("batch, n, heads, kv_heads, d", [(1, 1, 9, 3, 64), (2, 5, 4, 4, 8), (1, 3, 6, 2, 2)])
def test_fused_rope_is_apply_rope_bit_for_bit(batch, n, heads, kv_heads, d):
    torch.manual_seed(n * d)
    qkv = torch.randn(batch, n, (heads + 2 * kv_heads) * d) * 4
    cos, sin = rope_tables(torch.arange(n) + 300, d, 10000.0)
    cos, sin = cos.expand(batch, n, d), sin.expand(batch, n, d)
    heads_first = qkv.view(batch, n, -1, d).transpose(1, 2)
    want = apply_rope(heads_first[:, : heads + kv_heads], cos[:, None], sin[:, None])
    q, k = cpu_kernels.rope_qk(qkv, cos, sin, heads, kv_heads)
    assert torch.equal(q, want[:, :heads]) and torch.equal(k, want[:, heads:])
    with pytest.raises(RuntimeError, match="whole number of heads"):
        cpu_kernels.rope_qk(qkv[..., :-1], cos, sin, heads, kv_heads)


@needs_kernel
@pytest.mark.parametrize("n, length, d", [(1, 515, 64), (5, 97, 64), (6, 230, 128), (3, 3, 64), (16, 64, 128)])
def test_decode_attention_is_sdpa_up_to_rounding_and_rows_are_independent(n, length, d):
    torch.manual_seed(n * length)
    q = torch.randn(1, 9, n, d)
    keys, values = torch.randn(1, 3, length + 40, d) * 2, torch.randn(1, 3, length + 40, d)
    k, v = keys[:, :, :length], values[:, :, :length]  # views of a bigger buffer, as the KV cache gives
    seen = torch.rand(n, length) > 0.4
    seen[:, : length - n] = True
    seen[torch.arange(n), length - n + torch.arange(n)] = True  # every query sees the cache and itself
    tree = torch.zeros(n, length).masked_fill_(~seen, float("-inf"))
    causal = torch.ones(n, length, dtype=torch.bool).tril(length - n)
    for mask, reference_mask in ((None, causal), (tree, tree)):
        got = cpu_kernels.decode_attention(q, k, v, mask, 0.125)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask, scale=0.125, enable_gqa=True)
        torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=2e-6)
        last = cpu_kernels.decode_attention(q[:, :, -1:], k, v, None if mask is None else mask[-1:], 0.125)
        assert torch.equal(last[:, 0], got[:, -1])  # a row does not depend on the other queries
    if length > n:  # a masked key adds exact zeros: dropping it from the cache changes no bit
        hidden_first = tree.clone()
        hidden_first[:, 0] = float("-inf")
        assert torch.equal(cpu_kernels.decode_attention(q, k, v, hidden_first, 0.125),
                           cpu_kernels.decode_attention(q, k[:, :, 1:], v[:, :, 1:], hidden_first[:, 1:], 0.125))
    with pytest.raises(RuntimeError, match="head_dim 64 or 128"):
        cpu_kernels.decode_attention(q[..., :32], k[..., :32], v[..., :32], None, 0.125)


def test_build_failures_say_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FLASH_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C.. compiler.*install g.. or set CXX"):
        cpu_kernels.build()
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(cpu_kernels.KernelBuildError, match="compiling fp16_gemm.cpp and layer_ops.cpp failed"):
        cpu_kernels.build()
    assert not list((tmp_path / "kernels").iterdir())  # no half-written library left behind
    # kernel_available() (uncached here) turns a failed build into one line and the fbgemm fallback.
    monkeypatch.setattr(cpu_kernels, "_check_cpu", lambda: None)
    capsys.readouterr()
    assert cpu_kernels.kernel_available.__wrapped__() is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("Compiling") and "falling back to fbgemm" in err[1]


@needs_kernel
def test_build_is_cached(monkeypatch):
    library = cpu_kernels.build()
    monkeypatch.setenv("CXX", "false")  # would fail if it compiled again
    assert cpu_kernels.build() == library


@pytest.mark.skipif(not fbgemm_fp16_available(), reason="no fbgemm fp16 GEMM")
def test_fbgemm_fallback_on_request(monkeypatch):
    monkeypatch.setenv("FLASH_FP16_KERNEL", "fbgemm")
    torch.manual_seed(1)
    linear = torch.nn.Linear(24, 40)
    layer = Fp16Linear(linear)
    assert layer.backend == "fbgemm" and "fbgemm" in repr(layer)
    x = torch.randn(3, 24)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, linear.weight.half().float(), linear.bias),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (1, 7), (5, 7), (2, 3, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_linear_is_the_fp16_rounded_weight_in_fp32_math(shape, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(7, 11, bias=bias)
    x = torch.randn(shape)
    rounded = torch.nn.functional.linear(x, linear.weight.half().float(), linear.bias)
    with torch.inference_mode():
        out = Fp16Linear(linear)(x)
    assert out.shape == (*shape[:-1], 11) and out.dtype == torch.float32
    torch.testing.assert_close(out, rounded, rtol=1e-5, atol=1e-5)
    # ... and not the fp32 weight: the rounding is real (so the test above could fail).
    assert not torch.equal(out, torch.nn.functional.linear(x, linear.weight, linear.bias))


def test_convert_linears_replaces_every_linear():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    assert convert_linears(model) == 2
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.inference_mode():
        assert model(torch.randn(3, 4)).shape == (3, 2)


@pytest.fixture(scope="module")
def fp32_target():
    from flash.targets.embedded import load_embedded_target
    from flash.weights import WeightsError

    try:
        return load_embedded_target(quiet=True, fp16_weights=False, lm="smollm2")
    except WeightsError as exc:
        pytest.skip(f"default target weights unavailable: {exc}")


def test_default_target_fp16_weights_stay_close_to_fp32(smollm2_target, fp32_target, photos):
    """The claim in EmbeddedTarget's docstring: logits within ~0.05 of the fp32 model, same greedy text."""
    assert smollm2_target.weight_format == "fp16" and fp32_target.weight_format == "fp32"
    config = GenerationConfig(max_new_tokens=32, rules=smollm2_target.logits_rules())
    for name in ("chelsea", "coffee"):
        prompts = [t.build_prompt(photos[name], t.default_prompt(photos[name])) for t in (smollm2_target, fp32_target)]
        fp16_pre, fp32_pre = (t.prefill(p) for t, p in zip((smollm2_target, fp32_target), prompts, strict=True))
        assert (fp16_pre.last_logits - fp32_pre.last_logits).abs().max() < 0.1
        tokens = [collect(generate(t, p, "ar", None, config)).tokens for t, p in
                  zip((smollm2_target, fp32_target), prompts, strict=True)]
        assert tokens[0] == tokens[1], name


def test_shipped_draft_packed_is_lossless_and_accepts(smollm2_target, photos):
    from flash.models import load_draft

    draft = load_draft(smollm2_target, quiet=True)
    assert draft._head_fp16 is not None  # load_draft packs for the fp16 default target
    media = photos["coffee"]
    prompt = smollm2_target.build_prompt(media, smollm2_target.default_prompt(media))
    config = GenerationConfig(max_new_tokens=48, rules=smollm2_target.logits_rules())
    ar = collect(generate(smollm2_target, prompt, "ar", None, config))
    flash = collect(generate(smollm2_target, prompt, "flash", draft, config))
    assert flash.tokens == ar.tokens
    assert flash.accepted > 0 and flash.steps < len(ar.tokens)
