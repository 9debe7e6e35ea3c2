"""The decoding engine: the loops (``ar``, ``eagle``, ``flash``, ``flash-tree``, ``pld``), what they
propose with, how they verify, and the events they yield.

The names below are the engine's public face: the app, the CLI, the race and the benchmark import
them from here and nothing deeper. They are imported on first use (PEP 562): the loops need torch,
and the CLI reads only the settings (``GenerationConfig``, ``METHODS``) before it has checked its
input, so ``python -m flash --help`` and a mistyped path answer before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "DEFAULT_MIN_DRAFT_PROB": "config",
    "METHODS": "config",
    "GenerationConfig": "config",
    "TreeConfig": "config",
    "GenerationResult": "events",
    "StepEvent": "events",
    "collect": "events",
    "flash_method": "loops",
    "generate": "loops",
}

__all__ = [
    "DEFAULT_MIN_DRAFT_PROB",
    "METHODS",
    "GenerationConfig",
    "GenerationResult",
    "StepEvent",
    "TreeConfig",
    "collect",
    "flash_method",
    "generate",
]

if TYPE_CHECKING:
    from flash.engine.config import DEFAULT_MIN_DRAFT_PROB, METHODS, GenerationConfig, TreeConfig
    from flash.engine.events import GenerationResult, StepEvent, collect
    from flash.engine.loops import flash_method, generate


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'flash.engine' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"flash.engine.{_WHERE[name]}"), name)
    globals()[name] = value  # once imported, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
