"""Where a decoding step's time goes (the default model, CPU): ``python research/profile_step.py [MEDIA]``.

Runs ``ar``, ``flash`` and ``flash-tree`` once each to warm up, then once each under cProfile, and prints per-step
milliseconds split into: the target's forward (its fp16 GEMMs vs everything else inside it: norms,
rotary, attention, cache, Python), the draft (proposing, and folding accepted tokens in), and the
rest (logits rules, verification, the loop). cProfile adds a little overhead to Python-heavy parts.
"""

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from default_run import DEFAULT_MEDIA, add_model_arg, default_run  # noqa: E402 (a sibling script)

from flash.engine import collect, generate  # noqa: E402

PARTS = {  # (file suffix, function name) -> label; cumulative times
    ("targets/embedded.py", "forward"): "target forward",
    ("targets/embedded.py", "forward_tree"): "target forward (tree pass)",
    ("cpu/fp16_linear.py", "forward"): "  of which fp16 GEMMs (target + draft)",
    ("engine/proposers.py", "propose"): "draft: propose",
    ("engine/proposers.py", "propose_tree"): "draft: propose a tree",
    ("targets/base.py", "keep"): "target cache: keep the accepted path",
    ("engine/proposers.py", "update"): "draft: fold in accepted tokens",
    ("engine/logits_rules.py", "apply"): "logits rules (target and draft)",
}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("media", nargs="?", default=DEFAULT_MEDIA,
                    help="image or video to caption (default: the shipped cat.jpg)")
add_model_arg(parser)
args = parser.parse_args()
target, draft, prompt, config = default_run(args.media, model=args.model)
for method in ("ar", "flash", "flash-tree"):
    collect(generate(target, prompt, method, draft, config))
    profiler = cProfile.Profile()
    profiler.enable()
    result = collect(generate(target, prompt, method, draft, config))
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    steps = result.steps
    decode_ms = (result.seconds - result.prefill_seconds) * 1000
    print(f"{method}: {result.new_tokens} tokens in {steps} steps (tau {result.tau:.2f}), "
          f"{decode_ms / steps:.1f} ms per step after the prefill")
    for (suffix, name), label in PARTS.items():
        total = sum(v[3] for (file, _, func), v in stats.items() if file.endswith(suffix) and func == name)
        if total:
            print(f"  {label:40s} {total * 1000 / steps:6.1f} ms/step")
