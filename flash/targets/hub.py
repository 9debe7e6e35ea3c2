"""Loading a Hugging Face checkpoint (hub id or local directory) as the target of its model family."""

from __future__ import annotations

from typing import Any

import torch

from flash.targets.base import TargetModel
from flash.targets.hf import fetch_pretrained
from flash.targets.llava import load_llava
from flash.targets.qwen2_5_vl import load_qwen2_5_vl


class TargetLoadError(RuntimeError):
    """A target model could not be loaded (missing weights, unsupported architecture)."""


def _not_available(model_id: str, err: Exception) -> TargetLoadError:
    return TargetLoadError(
        f"model {model_id!r} is not available offline: download it first with "
        f"`hf download {model_id}` or set HF_HOME to a cache that holds it ({type(err).__name__})"
    )


def load_hf_target(
    model_id: str, *, device_map: Any = "auto", dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> TargetModel:
    """Load a LLaVA or Qwen2.5-VL checkpoint (hub id or local dir) as a :class:`TargetModel`.

    ``dtype`` defaults to bf16 on CUDA and float32 on CPU. ``device_map`` is passed to accelerate
    on CUDA (one or several GPUs); on a CPU-only machine the model loads plainly on the CPU.
    ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``...) defaults to transformers'
    choice; draft trees verify on ``sdpa`` and ``eager`` (:data:`flash.targets.hf.TREE_ATTENTION`), chains on all.
    Raises :class:`TargetLoadError` when the weights are missing or the architecture unsupported.
    """
    from transformers import AutoConfig, LlavaConfig, Qwen2_5_VLConfig

    try:
        config = fetch_pretrained(AutoConfig.from_pretrained, model_id)
    except (OSError, ValueError) as err:
        raise _not_available(model_id, err) from err
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map if cuda else None}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    name = model_id.rstrip("/")
    try:
        if isinstance(config, LlavaConfig):
            return load_llava(model_id, name, kwargs)
        if isinstance(config, Qwen2_5_VLConfig):
            return load_qwen2_5_vl(model_id, name, kwargs)
    except OSError as err:
        raise _not_available(model_id, err) from err
    except (ImportError, ValueError) as err:  # e.g. flash_attention_2 asked for without flash-attn installed
        raise TargetLoadError(f"cannot load {model_id!r}: {' '.join(str(err).split())}") from err
    kind = type(config).__name__
    raise TargetLoadError(f"model {model_id!r} is a {kind}: only LLaVA and Qwen2.5-VL are supported")
