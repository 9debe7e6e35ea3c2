"""How much a k-token target forward costs relative to a one-token step (the default model, CPU).

Speculative decoding pays off only when τ exceeds this ratio. Run: ``python scripts/verify_cost.py``.
Prints the median of 12 forwards per size, against a cache holding the coffee example's prompt.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flash.media import load_media  # noqa: E402
from flash.models import load_target  # noqa: E402

target = load_target("default", quiet=True)
media = load_media(Path(__file__).resolve().parent.parent / "assets" / "examples" / "coffee.jpg")
prefill = target.prefill(target.build_prompt(media, target.default_prompt(media)))
length, median = prefill.state.length, {}
for n in (1, 2, 3, 5, 8):
    times = []
    for _ in range(12):
        start = time.perf_counter()
        target.forward(prefill.state, torch.full((1, n), 100))
        times.append(time.perf_counter() - start)
        target.crop(prefill.state, length)
    median[n] = sorted(times)[len(times) // 2]
print(f"{torch.get_num_threads()} threads; one token: {median[1] * 1000:.1f} ms")
for n, t in median.items():
    print(f"{n} tokens: {t * 1000:.1f} ms = {t / median[1]:.2f}x a one-token step")
