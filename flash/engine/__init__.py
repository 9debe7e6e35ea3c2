"""The decoding engine: the loops (``ar``, ``eagle``, ``flash``, ``flash-tree``, ``pld``), what they
propose with, how they verify, and the events they yield.

The names below are the engine's public face: the app, the CLI, the race and the benchmark import
them from here and nothing deeper.
"""

from flash.engine.config import DEFAULT_MIN_DRAFT_PROB, METHODS, GenerationConfig, TreeConfig
from flash.engine.events import GenerationResult, StepEvent, collect
from flash.engine.loops import flash_method, generate

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
