"""A lean forward pass for a transformers Llama-architecture LM (SmolLM2, Qwen2's q/k/v biases too), CPU.

transformers' decoder layers run q, k, v, gate and up as five separate GEMMs and wrap every layer
in generic machinery (mask building, keyword plumbing, attention dispatch). On a 2-core CPU that
fixed cost is a large share of a one-token step. This runs the same weights the way gpt-fast does:
q/k/v fused into one GEMM and gate/up into one (each output column is computed exactly as before,
so the numbers do not change), one plain loop over the layers, torch's one-call RMSNorm, one rotary
call for the q and k heads together, the in-place KV cache (:mod:`flash.targets.kv_cache`) and grouped-KV
SDPA (:func:`flash.cpu.gqa_attention.gqa_sdpa_attention`). The model's own embedding, norm weights and
rotary embedding module are reused. Tested bit-identical to transformers' modules
(``tests/test_lean_attention.py``); docs/cpu_engineering.md has the timings.

With ``fused_ops`` (the default model, where FLASH's CPU kernels build) the norms and the rotary
embedding run as one C++ call each (:func:`flash.cpu.cpu_kernels.rms_norm`, :func:`flash.cpu.cpu_kernels.rope_qk`),
and passes of a few queries over one sequence take :func:`flash.cpu.cpu_kernels.decode_attention`: the
rotary embedding is still bit-identical, the norms and attention equal torch's up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flash.cpu import cpu_kernels
from flash.cpu.gqa_attention import gqa_sdpa_attention
from flash.cpu.rope import apply_rope

#: Queries up to which a pass (a decoding step, a draft tree's verification) runs FLASH's C++ attention.
DECODE_ATTENTION_MAX_QUERIES = 16

#: Builds an inference linear layer from a weight [out, in] and an optional bias [out]: fp32 or fp16-packed.
LinearFactory = Callable[[torch.Tensor, torch.Tensor | None], nn.Module]


def fp32_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """A plain fp32 ``nn.Linear`` holding ``weight`` (and ``bias``, if any)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
    return layer


def _fused_bias(*layers: nn.Linear) -> torch.Tensor | None:
    """The biases of ``layers`` concatenated (Qwen2's q/k/v), or None when none has one (Llama)."""
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                      for layer in layers])


class LeanBlock(nn.Module):
    """One decoder layer: pre-norm attention with fused q/k/v, pre-norm SwiGLU MLP with fused gate/up."""

    def __init__(self, layer: nn.Module, linear: LinearFactory, fused_ops: bool = False) -> None:
        super().__init__()
        self.fused_ops = fused_ops
        attn, mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.heads, self.kv_heads = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.intermediate = mlp.gate_proj.out_features
        with torch.no_grad():
            self.qkv = linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                              _fused_bias(attn.q_proj, attn.k_proj, attn.v_proj))
            self.o_proj = linear(attn.o_proj.weight, None)
            self.gate_up = linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None)
            self.down_proj = linear(mlp.down_proj.weight, None)

    def forward(self, x: torch.Tensor, cache_layer, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, decode_attention: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(_rms_norm(self.input_layernorm, x, self.fused_ops))
        if self.fused_ops:  # cos/sin [B, n, d]
            q, k = cpu_kernels.rope_qk(qkv, cos, sin, self.heads, self.kv_heads)
            v = qkv.view(b, n, -1, self.head_dim)[:, :, self.heads + self.kv_heads :].transpose(1, 2)
        else:  # cos/sin [B, 1, n, d]
            qkv = qkv.view(b, n, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
            qk, v = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=1)
            qk = apply_rope(qk, cos, sin)  # q and k heads in one go: the same elementwise ops, half the calls
            q, k = qk.split([self.heads, self.kv_heads], dim=1)
        k, v = cache_layer.update(k, v)
        if decode_attention:  # FLASH's C++ attention for a few queries (mask: additive [n, kv] or causal)
            attn = cpu_kernels.decode_attention(q, k, v, mask, self.scaling)
        else:
            attn, _ = gqa_sdpa_attention(None, q, k, v, mask, scaling=self.scaling, is_causal=True)
        x = x + self.o_proj(attn.reshape(b, n, -1))
        gate, up = self.gate_up(_rms_norm(self.post_attention_layernorm, x, self.fused_ops)).split(
            self.intermediate, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


def _rms_norm(norm: nn.Module, x: torch.Tensor, fused_ops: bool) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` (fp32 activations): torch's one-call ``rms_norm`` (the same
    numbers, tested bit for bit, without its six Python-level ops), or FLASH's C++ one (one op)."""
    if fused_ops:
        return cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    return F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)


class LeanLlama(nn.Module):
    """The decoder stack of a transformers ``LlamaModel`` or ``Qwen2Model`` (its weights, fused), run in one loop.

    Supports what the decoding loops and the batched distillation need: token ids or input
    embeddings, explicit positions, a 4D boolean mask (a draft tree) or a 2D padding mask (a
    left-padded batch), and causal attention after the cached prefix otherwise.
    """

    def __init__(self, model: nn.Module, linear: LinearFactory = fp32_linear, fused_ops: bool = False) -> None:
        super().__init__()
        self.fused_ops = fused_ops
        cfg = model.config
        # q/k/v biases are fused with their weights (Qwen2); biases elsewhere are not supported.
        unsupported_bias = any(
            layer.self_attn.o_proj.bias is not None
            or any(getattr(layer.mlp, name).bias is not None for name in ("gate_proj", "up_proj", "down_proj"))
            for layer in model.layers)
        if getattr(cfg, "hidden_act", "silu") != "silu" or unsupported_bias:
            raise ValueError("LeanLlama supports Llama/Qwen2 layers with SiLU and biases on q/k/v only")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise ValueError("LeanLlama runs full attention only; this model uses a sliding window")
        self.embed_tokens, self.rotary_emb, self.norm = model.embed_tokens, model.rotary_emb, model.norm
        self.layers = nn.ModuleList(LeanBlock(layer, linear, fused_ops) for layer in model.layers)
        self.head_dim = self.layers[0].head_dim if len(self.layers) else 0

    @torch.inference_mode()
    def forward(self, cache, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append to ``cache`` (one :class:`flash.targets.kv_cache.InPlaceLayer` per layer); returns the last
        hidden states [B, n, D] (after the final norm)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = x.shape[:2]
        past = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=x.device)[None]
        cos, sin = self.rotary_emb(x, position_ids)  # [B, n, d]
        if not self.fused_ops:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, n, d]: broadcast over heads
        # Decoding steps and verification passes (one sequence, a few queries) take FLASH's C++ attention
        # where it runs; prefills and left-padded batches keep SDPA.
        decode = (self.fused_ops and b == 1 and n <= DECODE_ATTENTION_MAX_QUERIES and self.head_dim in (64, 128)
                  and (attention_mask is None or attention_mask.dim() == 4))
        # (The C++ attention needs no mask for causal attention; a tree's mask becomes additive once.)
        causal_decode = decode and attention_mask is None
        mask = None if causal_decode else _attention_mask(attention_mask, n, past + n, x.dtype, x.device)
        for block, cache_layer in zip(self.layers, cache.layers, strict=True):
            x = block(x, cache_layer, cos, sin, mask, decode)
        return _rms_norm(self.norm, x, self.fused_ops)


def _attention_mask(attention_mask: torch.Tensor | None, n: int, kv: int, dtype: torch.dtype,
                    device) -> torch.Tensor | None:
    """The mask every layer's attention gets, built once per forward as an additive mask (0 or -inf,
    in the activations' dtype): a boolean one costs SDPA a conversion in each of the 30 layers (~40 us
    each at an image's context, 5 queries). None where plain causal attention is right: one query, or
    a prefill with nothing cached. A 4D boolean mask (a draft tree) is converted as given; a 2D padding
    mask [B, kv] becomes [B, 1, n, kv] causal-and-not-padding; queries after a cached prefix get the
    bottom-right causal triangle (SDPA's ``is_causal`` aligns it top-left)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return _additive(attention_mask, dtype) if attention_mask.dtype == torch.bool else attention_mask
    if attention_mask is None and (n == 1 or n == kv):
        return None
    causal = torch.ones(n, kv, dtype=torch.bool, device=device).tril(kv - n)
    if attention_mask is None:
        return _additive(causal, dtype)
    mask = causal[None] & attention_mask.bool()[:, None, :]
    # A left-pad query sees no key; let it see every key so its (unused) output stays finite on every
    # SDPA kernel (some return NaN for such a row, and a NaN value would poison the others through P @ V).
    mask |= ~mask.any(-1, keepdim=True)
    return _additive(mask[:, None], dtype)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = may attend) -> 0 / -inf, exactly what SDPA makes of it itself."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
