"""Which ops a default-model prefill, its 1- and 5-token passes and a 5-token tree pass spend their time in
(torch.profiler).

    python research/pass_profile.py [MEDIA] [--passes 20]

The prefill of MEDIA's prompt (default: the shipped coffee_rocket_cut.mp4, 515 positions), then
passes of 1 and of 5 random tokens after it, each cropped back; per setting, the ops with the most
self CPU time, in milliseconds per prefill or per pass. Unlike ``research/step_split.py`` (wall-clock
timers around the decoding loop's functions) this looks inside the target's forward: which GEMMs,
attention kernels and small ops a verification pass adds over a one-token step.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.engine.tree import DraftTree, tree_attention  # noqa: E402
from flash.media import MediaError, load_media  # noqa: E402
from flash.targets.embedded import load_embedded_target  # noqa: E402


def top_ops(run, repeats: int, rows: int = 8) -> tuple[float, list[tuple[str, float, int]]]:
    """The wall-clock median ms of ``repeats`` unprofiled runs of ``run()``, then (op name, self CPU ms per
    repeat, calls per repeat) of its ``rows`` costliest ops under the profiler."""
    for _ in range(2):  # warm-up
        run()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return 1000 * statistics.median(walls), [(e.key, e.self_cpu_time_total / 1000 / repeats, e.count // repeats)
                                             for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("media", nargs="?", default=str(ROOT / "assets" / "examples" / "coffee_rocket_cut.mp4"))
    parser.add_argument("--passes", type=int, default=20, help="passes profiled per size (default 20)")
    parser.add_argument("--lm", choices=("qwen2.5", "smollm2"), default="qwen2.5",
                        help="the embedded model's language model (default: the default model's, qwen2.5)")
    args = parser.parse_args()
    try:
        media = load_media(args.media)
    except MediaError as exc:
        sys.exit(f"error: {exc}")
    target = load_embedded_target(quiet=True, lm=args.lm)
    prompt = target.build_prompt(media, target.default_prompt(media))
    state = target.prefill(prompt).state
    settings = {f"prefill ({prompt.length} positions)": (lambda: target.prefill(prompt), max(2, args.passes // 4))}
    for n in (1, 5):
        ids = torch.randint(200, 5000, (1, n))

        def one_pass(ids=ids) -> None:
            target.forward(state, ids)
            target.crop(state, prompt.length)

        settings[f"{n}-token pass"] = (one_pass, args.passes)
    # flash-tree's pass: the root and 4 draft tokens as a tree (two children of the root, a chain of two
    # under the first), laid out as the decoding loop lays it out.
    root, *drafts = torch.randint(200, 5000, (5,)).tolist()
    tree = DraftTree(tokens=tuple(drafts), parents=(-1, -1, 0, 2), depths=(1, 1, 2, 3))
    mask, positions = tree_attention(tree, prompt.length)
    tree_ids = torch.tensor([[root, *tree.tokens]])

    def tree_pass() -> None:
        target.forward_tree(state, tree_ids, mask, positions)
        target.crop(state, prompt.length)

    settings["5-token tree pass"] = (tree_pass, args.passes)
    print(f"{torch.get_num_threads()} threads, CPU: {torch.backends.cpu.get_cpu_capability()}")
    for name, (run, repeats) in settings.items():
        wall, ops = top_ops(run, repeats)
        print(f"{name}, ms each (self CPU time; calls); {wall:.2f} ms wall clock each (median, unprofiled):")
        for key, ms, calls in ops:
            print(f"  {key:55s} {ms:8.2f}  ({calls})")


if __name__ == "__main__":
    main()
