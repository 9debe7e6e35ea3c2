"""fp16-weight linear layers (fbgemm): the kernel's math, and the default target / shipped draft on it."""

from __future__ import annotations

import pytest
import torch

from flash.decoding import GenerationConfig, collect, generate
from flash.fp16_linear import Fp16Linear, convert_linears, fp16_gemm_available

pytestmark = pytest.mark.skipif(not fp16_gemm_available(), reason="this torch build has no fbgemm fp16 GEMM")


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
    from flash.default_target import load_default_target
    from flash.weights import WeightsError

    try:
        return load_default_target(quiet=True, fp16_weights=False)
    except WeightsError as exc:
        pytest.skip(f"default target weights unavailable: {exc}")


def test_default_target_fp16_weights_stay_close_to_fp32(default_target, fp32_target, photos):
    """The claim in DefaultTarget's docstring: logits within ~0.05 of the fp32 model, same greedy text."""
    assert default_target.weight_format == "fp16" and fp32_target.weight_format == "fp32"
    config = GenerationConfig(max_new_tokens=32, rules=default_target.logits_rules())
    for name in ("chelsea", "coffee"):
        prompts = [t.build_prompt(photos[name], t.default_prompt(photos[name])) for t in (default_target, fp32_target)]
        fp16_pre, fp32_pre = (t.prefill(p) for t, p in zip((default_target, fp32_target), prompts, strict=True))
        assert (fp16_pre.last_logits - fp32_pre.last_logits).abs().max() < 0.1
        tokens = [collect(generate(t, p, "ar", None, config)).tokens for t, p in
                  zip((default_target, fp32_target), prompts, strict=True)]
        assert tokens[0] == tokens[1], name


def test_shipped_draft_packed_is_lossless_and_accepts(default_target, photos):
    from flash.models import load_draft

    draft = load_draft(default_target, quiet=True)
    assert draft._head_fp16 is not None  # load_draft packs for the fp16 default target
    media = photos["coffee"]
    prompt = default_target.build_prompt(media, default_target.default_prompt(media))
    config = GenerationConfig(max_new_tokens=48, rules=default_target.logits_rules())
    ar = collect(generate(default_target, prompt, "ar", None, config))
    flash = collect(generate(default_target, prompt, "flash", draft, config))
    assert flash.tokens == ar.tokens
    assert flash.accepted > 0 and flash.steps < len(ar.tokens)
