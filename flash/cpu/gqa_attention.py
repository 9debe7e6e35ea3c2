"""SDPA that keeps grouped-query key/value heads grouped for multi-token passes too (CPU).

transformers' ``sdpa`` attention copies every layer's keys and values ``num_key_value_groups``
times (``repeat_kv``) whenever a mask is passed, i.e. for every verification pass of more than one
token; ``enable_gqa`` only where the mask is ``None`` (one-token steps). torch's CPU kernel takes
``enable_gqa`` together with a mask, so speculative decoding need not pay that copy (measured
with :mod:`flash.targets.kv_cache`, whose docstring gives the numbers). Used by :mod:`flash.cpu.lean_llama`;
the signature is transformers' attention-function convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gqa_sdpa_attention(module: torch.nn.Module | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, q, d], key/value [B, H_kv, kv, d] -> output [B, q, H, d] (transformers' convention)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and kv_len != q_len:
        # SDPA's is_causal aligns the triangle top-left; queries after a cached prefix need bottom-right.
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        causal = False
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None
