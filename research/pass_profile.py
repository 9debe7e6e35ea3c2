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

from flash.media import MediaError, load_media  # noqa: E402
from flash.targets.embedded import load_embedded_target  # noqa: E402


def top_ops(run, repeats: int, rows: int = 8) -> list[tuple[str, float, int]]:
    """(op name, self CPU ms per repeat, calls per repeat) of the ``rows`` costliest ops of ``run()``;
    the first row is the wall-clock median of ``repeats`` unprofiled runs."""
    for _ in range(2):  # warm-up
        run()
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
    wall = [("(wall clock, unprofiled, median)", 1000 * statistics.median(walls), 1)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return wall + [(e.key, e.self_cpu_time_total / 1000 / repeats, e.count // repeats) for e in events]


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
    # flash-tree's pass: 4 draft tokens as a tree (two siblings, one of them with a chain of two) + the root.
    parents = [-1, 0, 0, 1, 3]
    mask = torch.zeros(len(parents), prompt.length + len(parents), dtype=torch.bool)
    mask[:, : prompt.length] = True
    depth = []
    for i, parent in enumerate(parents):
        mask[i, prompt.length + i] = True
        if parent >= 0:
            mask[i, prompt.length :] |= mask[parent, prompt.length :]
        depth.append(0 if parent < 0 else depth[parent] + 1)
    positions = prompt.length + torch.tensor(depth)
    tree_ids = torch.randint(200, 5000, (1, len(parents)))

    def tree_pass() -> None:
        target.forward_tree(state, tree_ids, mask, positions)
        target.crop(state, prompt.length)

    settings["5-token tree pass"] = (tree_pass, args.passes)
    print(f"{torch.get_num_threads()} threads, CPU: {torch.backends.cpu.get_cpu_capability()}")
    for name, (run, repeats) in settings.items():
        ops = top_ops(run, repeats)
        print(f"{name}, ms each (self CPU time; calls):")
        for key, ms, calls in ops:
            print(f"  {key:55s} {ms:8.2f}  ({calls})")


if __name__ == "__main__":
    main()
