"""Where a ``flash-tree`` step's time goes, by wall clock: ``python research/step_split.py [MEDIA] [--rounds N]``.

Unlike ``research/profile_step.py`` (cProfile, which inflates Python-heavy parts), this wraps the
decoding loop's own functions in ``time.perf_counter`` timers and runs ``ar`` and ``flash-tree``
alternately (default model, shipped draft, 128 greedy tokens). Per step after the prefill: the
target's pass, drafting the tree (the draft's pass, its logits, building the tree), laying out the
tree mask, walking the tree, keeping the accepted path in the KV cache, folding the accepted tokens
into the draft, and the loop's rest. Also prints tau x ar's ms per step / flash-tree's: the decoding
speed-up on this input in this run.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from default_run import DEFAULT_MEDIA, add_model_arg, default_run  # noqa: E402 (a sibling script)

import flash.engine.loops as loops  # noqa: E402
import flash.engine.proposers as proposers  # noqa: E402
from flash.draft import FlashDraft  # noqa: E402
from flash.engine import collect, generate  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("media", nargs="?", default=DEFAULT_MEDIA,
                    help="image or video to caption (default: the shipped cat.jpg)")
parser.add_argument("--rounds", type=int, default=2, help="ar / flash-tree pairs to run (default 2)")
parser.add_argument("--max-new-tokens", type=int, default=128)
add_model_arg(parser)
args = parser.parse_args()
target, draft, prompt, config = default_run(args.media, args.max_new_tokens, args.model)

spent: dict[str, float] = {}


def timed(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its wall time to ``spent[label]``."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


PARTS = [  # (owner, attribute, label); nested parts are indented
    (type(target), "forward", "target: one-token pass"),
    (type(target), "forward_tree", "target: tree pass"),
    (proposers.DraftProposer, "propose_tree", "drafting the tree"),
    (FlashDraft, "propose", "  the draft's pass"),
    (FlashDraft, "draft_logits", "  its logits"),
    (proposers, "build_tree", "  building the tree"),
    (loops, "tree_attention", "tree mask and positions"),
    (loops, "walk_tree", "walking the tree (target's rules, choice)"),
    (type(target), "keep", "KV cache: keep the accepted path"),
    (proposers.DraftProposer, "update", "draft: fold in accepted tokens"),
]
for owner, name, label in PARTS:
    timed(owner, name, label)

collect(generate(target, prompt, "flash-tree", draft, config))  # warm-up
ms_per_step = {}
for round_ in range(args.rounds):
    for method in ("ar", "flash-tree"):
        spent.clear()
        result = collect(generate(target, prompt, method, draft, config))
        step_ms = (result.seconds - result.prefill_seconds) * 1000 / result.steps
        ms_per_step[method] = step_ms
        print(f"round {round_ + 1}, {method}: {result.steps} steps, tau {result.tau:.2f}, {step_ms:.1f} ms per step")
        if method == "ar":
            continue
        top_level = 0.0
        for _, _, label in PARTS:
            if label in spent:
                ms = spent[label] * 1000 / result.steps
                top_level += 0 if label.startswith("  ") else ms
                print(f"  {label:44s} {ms:6.2f} ms")
        print(f"  {'the loop, the rest':44s} {step_ms - top_level:6.2f} ms")
        print(f"  decoding speed-up here: tau {result.tau:.2f} x {ms_per_step['ar']:.1f} / {step_ms:.1f} = "
              f"{result.tau * ms_per_step['ar'] / step_ms:.2f}x")
