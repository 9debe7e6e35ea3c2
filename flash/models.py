"""Model presets and loading: which target and which draft a request uses.

The app, the CLI and the benchmark call :func:`load_target` / :func:`load_draft`; loaded models
are kept in this module's one explicit cache (callers keep none of their own), so a server loads
each model once and switching models frees the previous one:

* at most one hub target at a time: loading another one first drops the previous one and the drafts
  bound to it and frees their memory (the presets' 7-8B parameters are 14-17 GB of weights in bf16:
  switching presets must not keep every one loaded);
* the embedded CPU targets (``EMBEDDED_MODELS``) stay once loaded: they take no GPU memory, only CPU
  RAM (process RSS went from 0.23 to 1.30 GB loading the default one and its draft), and the app
  opens on one of them, so switching back to it is instant;
* drafts are cached per target object and path; a model change drops those of every target the cache
  no longer holds (a caller's own targets' too), since a draft holds its target (it borrows its
  embeddings) and would keep it in memory.

A caller that still holds an evicted model (a race in progress) keeps it alive until it lets go.
"""

from __future__ import annotations

import gc
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from flash.draft import DraftConfig, DraftError, FlashDraft
from flash.model_names import DEFAULT_MODEL, EMBEDDED_ALIASES, EMBEDDED_MODELS
from flash.model_names import distill_dir as distill_dir  # re-exported: callers import them from here too
from flash.model_names import is_embedded as is_embedded
from flash.targets.base import TargetModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: The draft shipped for each embedded LM, trained with ``python -m flash train``.
SHIPPED_DRAFTS = {"qwen2.5": ASSETS / "drafts" / "qwen2.5", "smollm2": ASSETS / "drafts" / "smollm2"}
DEFAULT_DRAFT = SHIPPED_DRAFTS[EMBEDDED_MODELS[DEFAULT_MODEL]]


@dataclass(frozen=True)
class Preset:
    """A model the app offers: a target (``default`` or a hub id) and its draft (a path or hub id)."""

    label: str
    target: str
    draft: str | None

    @property
    def needs_gpu(self) -> bool:
        """Hub models are offered for GPUs; the embedded ones run on any CPU."""
        return self.target not in EMBEDDED_MODELS


PRESETS = (
    Preset("Default (CPU, embedded Qwen2.5-Coder-0.5B + MobileNetV2)", DEFAULT_MODEL, str(DEFAULT_DRAFT)),
    Preset("SmolLM2-135M (CPU, embedded: faster, weaker captions)", "smollm2",
           str(SHIPPED_DRAFTS["smollm2"])),
    Preset("LLaVA-1.5-7B (GPU)", "llava-hf/llava-1.5-7b-hf", "drafts/llava-1.5-7b"),
    Preset("Qwen2.5-VL-7B (GPU)", "Qwen/Qwen2.5-VL-7B-Instruct", "drafts/qwen2.5-vl-7b"),
)

_TARGETS: dict[str, TargetModel] = {}  # the embedded targets and at most one hub target (module docstring)
_DRAFTS: dict[tuple[int, str | None], tuple[TargetModel, FlashDraft]] = {}  # (id(target), path) -> bound draft
_LOCK = threading.RLock()  # the app loads from several request threads


def load_target(model: str = DEFAULT_MODEL, *, quiet: bool = False) -> TargetModel:
    """The target named ``model`` ("default", a HuggingFace hub id or a local checkpoint directory),
    loaded once per process; loading a hub target evicts the previous one (module docstring)."""
    model = EMBEDDED_ALIASES.get(model, model)
    with _LOCK:
        if model not in _TARGETS:
            if model in EMBEDDED_MODELS:
                from flash.targets.embedded import load_embedded_target

                _TARGETS[model] = load_embedded_target(quiet=quiet, lm=EMBEDDED_MODELS[model])
            else:
                from flash.targets.hub import load_hf_target

                _evict(keep=tuple(EMBEDDED_MODELS))  # before loading: the two must not be in memory at once
                _TARGETS[model] = load_hf_target(model)
        return _TARGETS[model]


def loaded_targets() -> tuple[str, ...]:
    """The ``model`` names whose targets the cache holds now (oldest first)."""
    with _LOCK:
        return tuple(_TARGETS)


def evict(keep: tuple[str, ...] = ()) -> None:
    """Drop every cached target not named in ``keep``, with the drafts bound to it, and free their memory."""
    with _LOCK:
        _evict(keep)


def _evict(keep: tuple[str, ...]) -> None:
    gone = [model for model in _TARGETS if model not in keep]
    for model in gone:
        del _TARGETS[model]
    _drop_stale_drafts()
    if gone:
        gc.collect()  # model graphs hold reference cycles: free them now, not at some later collection
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the freed blocks back, so the next model (or process) can use them


def _drop_stale_drafts() -> None:
    """Forget drafts whose target is not cached: each one keeps its target alive."""
    live = list(_TARGETS.values())
    for key, (target, _) in list(_DRAFTS.items()):
        if not any(target is other for other in live):
            del _DRAFTS[key]


def load_draft(target: TargetModel, path: str | Path | None = None, *, quiet: bool = False) -> FlashDraft:
    """The draft at ``path`` (default: the shipped draft for an embedded target), bound to ``target``.

    With no path and no shipped draft, an untrained draft is used: output stays exact, only slower.
    Cached per target object and path until a model change drops the target (module docstring).
    """
    shipped = SHIPPED_DRAFTS.get(getattr(getattr(target, "spec", None), "key", None))
    if path is None and shipped is not None and (shipped / "draft_config.json").exists():
        path = shipped
    # A draft is bound to one target object: the same name loaded twice (another device map, say)
    # gets its own binding rather than a draft reading the other object's embeddings.
    key = (id(target), None if path is None else str(Path(path).resolve()))
    with _LOCK:
        if key not in _DRAFTS or _DRAFTS[key][0] is not target:  # `is`: an id can be reused
            _DRAFTS[key] = (target, _load_draft(target, path, quiet))
        return _DRAFTS[key][1]


def _load_draft(target: TargetModel, path: str | Path | None, quiet: bool) -> FlashDraft:
    if path is None:
        if not quiet:
            print("warning: no trained draft for this target; using an untrained one (exact output, "
                  "low acceptance). Train one with `python -m flash train`.", file=sys.stderr)
        cfg = DraftConfig(target_name=target.name, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                          num_heads=draft_heads_for(target.hidden_size))
        with torch.random.fork_rng(devices=[]):  # reproducible weights without touching the caller's RNG
            torch.manual_seed(0)
            draft = FlashDraft(cfg)
    else:
        if not Path(path).exists():
            raise DraftError(f"no draft at {path}: train one with `python -m flash train --out {path}`")
        draft = FlashDraft.load(path)
    dtype = torch.float32 if target.dtype == torch.float32 else target.dtype
    draft = draft.to(device=target.device, dtype=dtype).bind(target).eval()
    if getattr(target, "weight_format", None) == "fp16":  # the embedded targets on CPU: same kernels
        draft.pack_fp16()
    return draft


def draft_heads_for(hidden: int) -> int:
    """The draft's attention head count for a target of width ``hidden``: heads of size 64 when possible."""
    for head_dim in (64, 32, 16, 8):
        if hidden % head_dim == 0:
            return hidden // head_dim
    return 1
