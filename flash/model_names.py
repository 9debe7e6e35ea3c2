"""The embedded models' names and where their training data lives: what the CLI needs to read its
arguments, without :mod:`flash.models`' torch (``python -m flash --help`` answers at once).
:mod:`flash.models` re-exports every name here."""

from __future__ import annotations

from pathlib import Path

from flash.weights import cache_dir

DEFAULT_MODEL = "default"
#: The embedded CPU models (flash.targets.embedded.EMBEDDED_LMS keys); "default" names one of them:
#: Qwen2.5, whose captions have no assistant self-talk and name more subjects (docs/qwen_model.md).
EMBEDDED_MODELS = {DEFAULT_MODEL: "qwen2.5", "smollm2": "smollm2"}
#: Other names accepted for them (the cache keys stay the ones above).
EMBEDDED_ALIASES = {"qwen2.5": DEFAULT_MODEL}


def distill_dir(model: str) -> Path:
    """Where ``python -m flash train`` keeps ``model``'s distilled records by default: an embedded model's
    under its LM's name ("qwen2.5", "smollm2"), whichever alias named it; a hub id with "/" as "--"."""
    folder = EMBEDDED_MODELS.get(EMBEDDED_ALIASES.get(model, model), model.replace("/", "--"))
    return cache_dir() / "distill" / folder


def is_embedded(model: str) -> bool:
    """Whether ``model`` names an embedded CPU model (a key of EMBEDDED_MODELS or one of its aliases)."""
    return EMBEDDED_ALIASES.get(model, model) in EMBEDDED_MODELS
