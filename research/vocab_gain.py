"""Would a larger draft vocabulary raise τ? The draft's head is rows of the target's frozen LM head,
so a trained draft can be evaluated with more rows without retraining.

On the held-out distillation records (greedy, teacher-forced, the target's rules applied), prints the
share of emitted tokens the draft's vocabulary holds, then τ and slot hit rates with the draft's own
vocabulary and with it extended by the next most frequent training tokens (the whole target
vocabulary last). Run: ``python research/vocab_gain.py [DRAFT_DIR] [--sizes 8192 49152]``.
"""

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flash.draft import DraftError, FlashDraft  # noqa: E402
from flash.models import EMBEDDED_MODELS, SHIPPED_DRAFTS, distill_dir, load_target  # noqa: E402
from flash.training.distill import load_records  # noqa: E402
from flash.training.trainer import TrainConfig, evaluate  # noqa: E402


def extended(draft: FlashDraft, vocab: torch.Tensor) -> FlashDraft:
    """``draft`` with the draft vocabulary ``vocab`` (a superset of its own), same trained weights."""
    bigger = FlashDraft(dataclasses.replace(draft.cfg, draft_vocab_size=vocab.numel()))
    bigger.register_buffer("draft_to_target", vocab, persistent=True)
    state = {name: t for name, t in draft.state_dict().items() if name != "draft_to_target"}
    missing, unexpected = bigger.load_state_dict(state, strict=False)
    assert missing == ["draft_to_target"] and not unexpected, (missing, unexpected)
    return bigger


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("draft_dir", nargs="?", default=None, help="a saved draft (default: the model's shipped one)")
parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384], help="extended vocabulary sizes")
parser.add_argument("--model", default="default", help="'default' (Qwen2.5) or 'smollm2'")
args = parser.parse_args()
args.draft_dir = args.draft_dir or str(SHIPPED_DRAFTS[EMBEDDED_MODELS[args.model]])
target = load_target(args.model, quiet=True)
try:
    draft = FlashDraft.load(args.draft_dir)
except DraftError as exc:
    sys.exit(f"error: {exc}")
records = load_records(distill_dir(args.model), target.name)
heldout = [r for r in records if r.split == "heldout"]
if not heldout:
    sys.exit("no held-out records: run `python -m flash train --distill-only` first")
own = draft.draft_to_target.tolist()
own_set = set(own)
emitted = [t for r in heldout for t in r.response.tolist()]
print(f"{len(heldout)} held-out records: {sum(t in own_set for t in emitted) / len(emitted):.3f} of their "
      f"{len(emitted)} emitted tokens are in the draft's {len(own)}-token vocabulary")
counts = Counter(t for r in records if r.split == "train" for t in r.response.tolist())
# The draft's own tokens first, then by training frequency, then every other id: each size takes a prefix.
ranked = list(dict.fromkeys(own + [t for t, _ in counts.most_common()] + list(range(target.vocab_size))))
cfg, rules = TrainConfig(rules_ce=True), target.logits_rules()
for size in [len(own)] + sorted({s for s in args.sizes if len(own) < s < target.vocab_size}) + [target.vocab_size]:
    vocab = ranked[:size]
    candidate = extended(draft, torch.tensor(sorted(vocab))).bind(target)
    metrics = evaluate(candidate, heldout, cfg, torch.device("cpu"), rules)
    print(f"vocabulary {len(vocab)}: " + "; ".join(
        f"{kind} tau {m['tau']:.3f}, slot hits {m['slot_hit_rate']}" for kind, m in metrics.items()), flush=True)
