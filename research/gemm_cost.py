"""FLASH's fp16 GEMM kernel vs fbgemm's on the default model's layer shapes: ``python research/gemm_cost.py``.

For each of a decoder layer's four GEMMs (q/k/v fused, o, gate/up fused, down) and the LM head, the
median microseconds of one call at 1, 2, 4, 5 and 8 rows, both kernels interleaved in one process,
the weights warm in cache. Then a decoding step's GEMMs as the forward runs them: 30 layers' own
weights and the head in order (269 MB of fp16, streamed from memory as in real decoding), median
milliseconds at 1 and 5 rows (``research/verify_cost.py`` has the whole forward). Random weights of
the real shapes (SmolLM2-135M). ``--layers N`` streams fewer layers (a quick run).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flash.cpu.fp16_linear import Fp16Linear  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
ROWS = (1, 2, 4, 5, 8)


def median_us(layer, x, repeats: int) -> float:
    for _ in range(10):
        layer(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e6


def build(linear: torch.nn.Linear, backend: str) -> Fp16Linear:
    os.environ["FLASH_FP16_KERNEL"] = backend  # read when the layer is built
    try:
        return Fp16Linear(linear)
    finally:
        del os.environ["FLASH_FP16_KERNEL"]


def stream_line(num_layers: int, repeats: int = 12) -> str:
    """A step's GEMMs over ``num_layers`` layers' own weights and the head, both kernels interleaved."""
    shapes = [SHAPES[name] for name in ("qkv", "o", "gate_up", "down")] * num_layers + [SHAPES["head"]]
    stacks = {b: [build(torch.nn.Linear(k, n, bias=False), b) for n, k in shapes] for b in ("flash", "fbgemm")}
    inputs = {m: [torch.randn(m, k) for _, k in shapes] for m in (1, 5)}
    times = {(b, m): [] for b in stacks for m in inputs}
    with torch.inference_mode():
        for _ in range(repeats):
            for m, xs in inputs.items():
                for b, stack in stacks.items():
                    start = time.perf_counter()
                    for layer, x in zip(stack, xs, strict=True):
                        layer(x)
                    times[b, m].append(time.perf_counter() - start)
    ms = {key: sorted(v)[repeats // 2] * 1e3 for key, v in times.items()}
    return (f"a step's GEMMs, {num_layers} layers + head, streamed (ms): "
            + "  ".join(f"{m}: {ms['flash', m]:6.1f} / {ms['fbgemm', m]:6.1f}" for m in inputs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="layers in the streamed step (default 30, the model's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; median us per call, FLASH kernel / fbgemm")
    layer_sum = {(name, m): 0.0 for name in ("flash", "fbgemm") for m in ROWS}
    with torch.inference_mode():
        for name, (out_features, in_features) in SHAPES.items():
            linear = torch.nn.Linear(in_features, out_features, bias=False)
            layers = {"flash": build(linear, "flash"), "fbgemm": build(linear, "fbgemm")}
            assert layers["flash"].backend == "flash", "FLASH's kernel is not available here"
            cells = []
            for m in ROWS:
                x = torch.randn(m, in_features)
                us = {b: median_us(layer, x, 30 if name == "head" else 200) for b, layer in layers.items()}
                if name != "head":
                    for b in us:
                        layer_sum[b, m] += us[b]
                cells.append(f"{m}: {us['flash']:6.0f} / {us['fbgemm']:6.0f}")
            print(f"{name:8s} " + "  ".join(cells))
    print("layer    " + "  ".join(f"{m}: {layer_sum['flash', m]:6.0f} / {layer_sum['fbgemm', m]:6.0f}" for m in ROWS))
    print(stream_line(args.layers))

