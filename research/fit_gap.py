"""Is a draft held back by data or by its fit? Teacher-forced τ on held-out records beside τ on records it
was trained on.

Greedy, the target's rules applied (as in training's held-out evaluation). If τ on its own training
records is far above held-out τ, more data would help; if both are low, the draft cannot fit the target
any better at its size. Run: ``python research/fit_gap.py [DRAFT_DIR] [--data-dir DIR] [--train-records N]``
(the default data dir is the distillation cache of the default model; the shipped draft was trained on
the built-in corpus's first items, which the one-hour recipe's cache, ``<cache>/distill/default-recipe``,
holds again).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from default_run import add_model_arg  # noqa: E402 (a sibling script)

from flash.draft import DraftError, FlashDraft  # noqa: E402
from flash.models import SHIPPED_DRAFTS, distill_dir, load_target  # noqa: E402
from flash.training.distill import load_records  # noqa: E402
from flash.training.trainer import TrainConfig, evaluate  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("draft_dir", nargs="?", default=None, help="a saved draft (default: the model's shipped one)")
parser.add_argument("--data-dir", default=None, help="distillation cache (default: the model's)")
add_model_arg(parser)
parser.add_argument("--train-records", type=int, default=120, help="training records to evaluate (every other one "
                    "of the first 2N: an item's greedy and sampled answers are neighbours)")
args = parser.parse_args()
target = load_target(args.model, quiet=True)
args.draft_dir = args.draft_dir or str(SHIPPED_DRAFTS[target.spec.key])  # as load_draft picks it
args.data_dir = args.data_dir or str(distill_dir(args.model))
try:
    draft = FlashDraft.load(args.draft_dir).bind(target)
except DraftError as exc:
    sys.exit(f"error: {exc}")
records = load_records(Path(args.data_dir), target.name)
splits = {"held-out": [r for r in records if r.split == "heldout"],
          "training": [r for r in records if r.split == "train"][: 2 * args.train_records : 2]}
cfg, rules = TrainConfig(rules_ce=True), target.logits_rules()
for name, subset in splits.items():
    if not subset:
        sys.exit(f"no {name} records in {args.data_dir}: run `python -m flash train --distill-only` first")
    metrics = evaluate(draft, subset, cfg, torch.device("cpu"), rules)
    print(f"{name} ({len(subset)} records): " + "; ".join(
        f"{kind} tau {m['tau']:.3f}, slot hits {m['slot_hit_rate']}" for kind, m in metrics.items()), flush=True)
