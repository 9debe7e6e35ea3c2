"""Model presets and loading: which target and which draft a request uses.

The app, the CLI and the benchmark call :func:`load_target` / :func:`load_draft`; loaded models
are kept in one explicit cache so a server loads each model once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from flash.draft import DraftConfig, DraftError, FlashDraft
from flash.target import TargetModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = "default"
DEFAULT_DRAFT = ASSETS / "drafts" / "default"


@dataclass(frozen=True)
class Preset:
    """A model the app offers: a target (``default`` or a hub id) and its draft (a path or hub id)."""

    label: str
    target: str
    draft: str | None


PRESETS = (
    Preset("Default (CPU, embedded SmolLM2-135M + MobileNetV2)", DEFAULT_MODEL, str(DEFAULT_DRAFT)),
    Preset("LLaVA-1.5-7B (GPU)", "llava-hf/llava-1.5-7b-hf", "drafts/llava-1.5-7b"),
    Preset("Qwen2.5-VL-7B (GPU)", "Qwen/Qwen2.5-VL-7B-Instruct", "drafts/qwen2.5-vl-7b"),
)

_TARGETS: dict[str, TargetModel] = {}  # explicit caches: one load per process
_DRAFTS: dict[tuple[str, str | None, int], tuple[TargetModel, FlashDraft]] = {}


def load_target(model: str = DEFAULT_MODEL, *, quiet: bool = False) -> TargetModel:
    """The target named ``model`` ("default" or a HuggingFace hub id), loaded once per process."""
    if model not in _TARGETS:
        if model == DEFAULT_MODEL:
            from flash.default_target import load_default_target

            _TARGETS[model] = load_default_target(quiet=quiet)
        else:
            from flash.hf_targets import load_hf_target

            _TARGETS[model] = load_hf_target(model)
    return _TARGETS[model]


def load_draft(target: TargetModel, path: str | Path | None = None, *, quiet: bool = False) -> FlashDraft:
    """The draft at ``path`` (default: the shipped draft for the default target), bound to ``target``.

    With no path and no shipped draft, an untrained draft is used: output stays exact, only slower.
    """
    if path is None and target.name.startswith("flash-default") and (DEFAULT_DRAFT / "draft_config.json").exists():
        path = DEFAULT_DRAFT
    # A draft is bound to one target object: the same name loaded twice (another device map, say)
    # gets its own binding rather than a draft reading the other object's embeddings.
    key = (target.name, None if path is None else str(Path(path).resolve()), id(target))
    if key not in _DRAFTS or _DRAFTS[key][0] is not target:  # `is`: an id can be reused
        _DRAFTS[key] = (target, _load_draft(target, path, quiet))
    return _DRAFTS[key][1]


def _load_draft(target: TargetModel, path: str | Path | None, quiet: bool) -> FlashDraft:
    if path is None:
        if not quiet:
            print("warning: no trained draft for this target; using an untrained one (exact output, "
                  "low acceptance). Train one with `python -m flash train`.", file=sys.stderr)
        cfg = DraftConfig(target_name=target.name, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                          num_heads=_heads_for(target.hidden_size))
        with torch.random.fork_rng(devices=[]):  # reproducible weights without touching the caller's RNG
            torch.manual_seed(0)
            draft = FlashDraft(cfg)
    else:
        if not Path(path).exists():
            raise DraftError(f"no draft at {path}: train one with `python -m flash train --out {path}`")
        draft = FlashDraft.load(path)
    dtype = torch.float32 if target.dtype == torch.float32 else target.dtype
    draft = draft.to(device=target.device, dtype=dtype).bind(target).eval()
    if getattr(target, "weight_format", None) == "fp16":  # the default target on CPU: same kernels
        draft.pack_fp16()
    return draft


def _heads_for(hidden: int) -> int:
    """A head count that divides ``hidden`` into heads of size 64 when possible."""
    for head_dim in (64, 32, 16, 8):
        if hidden % head_dim == 0:
            return hidden // head_dim
    return 1
