"""Shared set-up of the per-step scripts (``profile_step.py``, ``step_split.py``): the default model,
its shipped draft, and a greedy 128-token request for one image or video."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.engine import GenerationConfig  # noqa: E402
from flash.media import MediaError, load_media  # noqa: E402
from flash.models import EMBEDDED_ALIASES, EMBEDDED_MODELS, load_draft, load_target  # noqa: E402

DEFAULT_MEDIA = str(ROOT / "assets" / "examples" / "cat.jpg")


def add_model_arg(parser) -> None:
    """The research scripts' ``--model``: an embedded model, by its name or an alias (argparse refuses others
    in one line)."""
    parser.add_argument("--model", default="default", choices=(*EMBEDDED_MODELS, *EMBEDDED_ALIASES),
                        help="'default' (Qwen2.5; also 'qwen2.5') or 'smollm2'")


def default_run(media_path: str, max_new_tokens: int = 128, model: str = "default"):
    """(target, draft, prompt, config) for ``media_path`` with the default prompt, on the embedded ``model``
    ("default" or "smollm2") and its shipped draft; exits with a
    one-line error for media that cannot be read."""
    try:
        media = load_media(media_path)
    except MediaError as exc:
        sys.exit(f"error: {exc}")
    target = load_target(model, quiet=True)
    draft = load_draft(target, quiet=True)
    prompt = target.build_prompt(media, target.default_prompt(media))
    return target, draft, prompt, GenerationConfig(max_new_tokens=max_new_tokens, rules=target.logits_rules())
