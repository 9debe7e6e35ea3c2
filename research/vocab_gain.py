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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from default_run import add_model_arg  # noqa: E402 (a sibling script)

from flash.draft import DraftError, FlashDraft  # noqa: E402
from flash.models import SHIPPED_DRAFTS, distill_dir, load_target  # noqa: E402
from flash.training.distill import load_records  # noqa: E402
from flash.training.trainer import TrainConfig, draft_vocabulary, evaluate  # noqa: E402


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
add_model_arg(parser)
args = parser.parse_args()
target = load_target(args.model, quiet=True)
args.draft_dir = args.draft_dir or str(SHIPPED_DRAFTS[target.spec.key])  # as load_draft picks it
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
train_recs = [r for r in records if r.split == "train"]
cfg, rules = TrainConfig(rules_ce=True), target.logits_rules()
for size in [len(own)] + sorted({s for s in args.sizes if len(own) < s < target.vocab_size}) + [target.vocab_size]:
    # The draft's own tokens, then the most frequent training tokens: what `train --init-from` grows to.
    vocab = draft_vocabulary(train_recs, size, target.eos_token_ids, target.vocab_size, keep=own)
    candidate = extended(draft, vocab).bind(target)
    metrics = evaluate(candidate, heldout, cfg, torch.device("cpu"), rules)
    print(f"vocabulary {len(vocab)}: " + "; ".join(
        f"{kind} tau {m['tau']:.3f}, slot hits {m['slot_hit_rate']}" for kind, m in metrics.items()), flush=True)
