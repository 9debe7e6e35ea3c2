"""Run by tests/test_training.py under torchrun: train a draft on a tiny LLaVA and print a checksum.

Not a test module itself (no ``test_`` prefix): it needs a process group.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flash.targets.tiny import tiny_llava  # noqa: E402
from flash.training.distill import load_records  # noqa: E402
from flash.training.trainer import TrainConfig, train  # noqa: E402

target = tiny_llava(0)
records = load_records(Path(sys.argv[1]), target.name)
cfg = TrainConfig(k=2, num_latents=2, num_heads=4, intermediate_size=64, draft_vocab_size=64, epochs=2,
                  warmup_steps=1, lr=1e-2, minutes=float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
draft = train(target, records, Path(sys.argv[2]), cfg, log=lambda m: None)
with torch.no_grad():
    checksum = sum(float(p.double().sum()) for p in draft.parameters())
line = json.dumps({"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
                   "checksum": checksum}) + "\n"
os.write(1, line.encode())  # one write: the ranks end together and share the pipe, print could interleave
