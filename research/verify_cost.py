"""How much a k-token target forward costs relative to a one-token step (the default model, CPU).

Speculative decoding pays off only when τ exceeds this ratio. Run: ``python research/verify_cost.py``.
For an image prompt (coffee.jpg) and a video prompt (coffee_rocket_cut.mp4, 8 frames), with the
default lean forward (:mod:`flash.cpu.lean_llama`: fused projections, in-place KV cache, FLASH's C++
norms, rotary embedding and decoding attention) on FLASH's fp16 GEMM kernel (:mod:`flash.cpu.cpu_kernels`),
the same with torch's norms, rotary embedding and grouped-KV SDPA instead ("torch ops"), the default
on fbgemm's fp16 GEMM, and transformers' own modules, cache and sdpa (on FLASH's kernel), interleaved
in one process: the median of 15 forwards per size, each cropped back.
"""

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.media import load_media  # noqa: E402
from flash.targets.embedded import load_embedded_target  # noqa: E402

SIZES = (1, 2, 3, 5, 8)


def forward_medians(targets: dict, example: str, sizes, repeats: int) -> tuple[int, dict[str, dict[int, float]]]:
    """Median seconds of a target forward over n random tokens after ``example``'s prompt, each cropped
    back, for every target and n, interleaved. Returns (context length, {name: {n: seconds}})."""
    media = load_media(ROOT / "assets" / "examples" / example)
    states = {}
    for name, target in targets.items():
        prefill = target.prefill(target.build_prompt(media, target.default_prompt(media)))
        states[name] = (target, prefill.state, prefill.state.length)
    times = {(name, n): [] for name in targets for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            ids = torch.randint(200, 5000, (1, n))
            for name, (target, state, length) in states.items():
                start = time.perf_counter()
                target.forward(state, ids)
                times[name, n].append(time.perf_counter() - start)
                target.crop(state, length)
    length = next(iter(states.values()))[2]
    return length, {name: {n: sorted(times[name, n])[repeats // 2] for n in sizes} for name in targets}


if __name__ == "__main__":
    os.environ["FLASH_FP16_KERNEL"] = "fbgemm"  # read when each target's layers are built
    on_fbgemm = load_embedded_target(quiet=True, lm="smollm2")
    del os.environ["FLASH_FP16_KERNEL"]
    targets = {"lean": load_embedded_target(quiet=True, lm="smollm2"),
               "lean, torch ops": load_embedded_target(quiet=True, cpu_ops=False, lm="smollm2"),
               "lean, fbgemm": on_fbgemm, "transformers": load_embedded_target(quiet=True, lean=False, lm="smollm2")}
    print(f"{torch.get_num_threads()} threads; median ms per forward (x a one-token step of the same setting)")
    for example in ("coffee.jpg", "coffee_rocket_cut.mp4"):
        length, medians = forward_medians(targets, example, SIZES, repeats=15)
        for name, median in medians.items():
            row = "  ".join(f"{n}: {median[n] * 1000:.1f} ({median[n] / median[1]:.2f}x)" for n in SIZES)
            print(f"{example} (context {length}), {name:15s} {row}")
