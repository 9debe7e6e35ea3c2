"""How much the default model's logits rules change its picks, and where the draft loses to them.

On the held-out distillation records (greedy), teacher-forced, draft slot 0: how often the target's
raw argmax is the token it emitted (after repetition penalty and n-gram ban), how often the draft's
raw argmax equals the target's raw argmax, and how often the draft's rule-processed pick is the
emitted token; then that slot-0 hit rate by how sure the target itself was (the probability of its
top token after the rules): a draft can only guess an argmax the target's own logits barely decide.
Then what that caps: were the draft always right wherever the target's top probability is at least
0.3, its slot-0 hit rate, and the τ of the draft's k tokens each right at that rate, (1 - a^(k+1)) /
(1 - a) (an estimate that flatters the draft: it takes the slots as alike and independent, and later
slots do worse); and the hit rate the other positions would need for τ 3.5 (issue #4's target) even
then (over 1: out of reach even so). Last, for sampling: the expected slot-0 acceptance
sum_x min(p(x), q(x)) of the target's and the draft's rule-processed distributions at ``--temperature``
(the rejection sampler's acceptance).
Run: ``python research/rules_gap.py [DRAFT_DIR]`` (default: the shipped draft).
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from default_run import add_model_arg  # noqa: E402 (a sibling script)

from flash.models import distill_dir, load_target  # noqa: E402
from flash.training.distill import load_records  # noqa: E402
from flash.training.trainer import _sample_tensors  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
parser.add_argument("draft_dir", nargs="?", help="a saved draft (default: the shipped one)")
parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for the last line")
add_model_arg(parser)
args = parser.parse_args()
target = load_target(args.model, quiet=True)
if args.draft_dir:
    from flash.draft import DraftError, FlashDraft

    try:
        draft = FlashDraft.load(args.draft_dir)
        draft = (draft.pack_fp16() if target.weight_format == "fp16" else draft).bind(target)
    except DraftError as exc:
        sys.exit(f"error: {exc}")
else:
    from flash.models import load_draft

    draft = load_draft(target, quiet=True)
records = [r for r in load_records(distill_dir(args.model), target.name) if r.split == "heldout"]
if not records:
    sys.exit("no held-out records: run `python -m flash train --distill-only` first")
rules = target.logits_rules()
total = target_kept = draft_raw = 0
BUCKETS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
DRAFTS, GOAL_TAU, EASY = draft.cfg.k, 3.5, 0.3


def independent_chain_tau(rate: float, drafts: int = DRAFTS) -> float:
    """τ of a chain of ``drafts`` draft tokens, each accepted with probability ``rate`` (the target's own
    token counted)."""
    return sum(rate**i for i in range(drafts + 1))


def rate_for_tau(tau: float, drafts: int = DRAFTS) -> float:
    """The per-token acceptance :func:`independent_chain_tau` needs for ``tau`` (bisection: τ grows with the
    rate)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if independent_chain_tau(middle, drafts) < tau:
            low = middle
        else:
            high = middle
    return (low + high) / 2


confidence, hits = [], []  # per position: the target's top probability after the rules; slot-0 hit
overlap = []  # per position: sum_x min(p, q) at --temperature
with torch.no_grad():
    for rec in records:
        stream, gate, targets = _sample_tensors(draft, rec, 0.0, "cpu")
        valid = gate.shape[0] - 1  # slot 0 at response position r predicts response[r + 1]
        draft_logits = draft.draft_logits(draft.train_forward(stream, gate)[0, :valid]).float()
        target_logits = target.lm_head(targets[:valid].float()).float()
        target_raw = target_logits.argmax(-1)
        response = rec.response.tolist()
        emitted = torch.tensor(response[1 : 1 + valid])
        draft_processed = rules.apply(draft.to_target_vocab(draft_logits, float("-inf")), response, 1)
        processed = draft_processed.argmax(-1)
        total += valid
        target_kept += int((target_raw == emitted).sum())
        draft_raw += int((draft.to_target_ids(draft_logits.argmax(-1)) == target_raw).sum())
        target_processed = rules.apply(target_logits, response, 1)
        confidence.append(target_processed.softmax(-1).amax(-1))
        hits.append(processed == emitted)
        p, q = (target_processed / args.temperature).softmax(-1), (draft_processed / args.temperature).softmax(-1)
        overlap.append(torch.minimum(p, q).sum(-1))
print(f"{len(records)} held-out records, {total} positions")
print(f"target's raw argmax is the emitted token: {target_kept / total:.3f} (the rules change the rest)")
print(f"draft's raw argmax = target's raw argmax: {draft_raw / total:.3f}")
confidence, hits = torch.cat(confidence), torch.cat(hits).float()
print(f"draft's rule-processed pick = emitted token (slot-0 hit): {float(hits.mean()):.3f}")
print(f"target's top probability after the rules: mean {float(confidence.mean()):.3f}; by it, share of positions "
      "and the draft's slot-0 hit rate:")
for low, high in itertools.pairwise(BUCKETS):
    inside = (confidence >= low) & ((confidence < high) if high < 1.0 else (confidence <= high))
    if inside.any():
        print(f"  [{low:.1f}, {high:.1f}{']' if high == 1.0 else ')'}: {float(inside.float().mean()):.3f} of "
              f"positions, hit {float(hits[inside].mean()):.3f}")
hard = confidence < EASY
if hard.any():
    hard_share, hard_hit = float(hard.float().mean()), float(hits[hard].mean())
    capped, goal_rate = 1 - hard_share + hard_share * hard_hit, rate_for_tau(GOAL_TAU)
    capped_tau, hard_needed = independent_chain_tau(capped), (goal_rate - (1 - hard_share)) / hard_share
    print(f"always right where the target's top probability is >= {EASY}: slot-0 hit {capped:.3f}, so tau ~ "
          f"{capped_tau:.2f} with {DRAFTS} drafts; tau {GOAL_TAU} needs {goal_rate:.3f}, i.e. a hit rate of "
          f"{hard_needed:.3f} where it is under {EASY} (now {hard_hit:.3f})")
print(f"sampling at temperature {args.temperature}: expected slot-0 acceptance {float(torch.cat(overlap).mean()):.3f}")
