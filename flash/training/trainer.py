"""Train a FLASH draft by self-distillation (losses and tricks from FLASH.md).

Per slot i at response position t: SmoothL1(pred, h_{t+1+i}) + ce_weight * soft cross-entropy
between the draft-vocabulary logits of pred and of h_{t+1+i}. Uniform noise on the input
features, AdamW (0.9, 0.95), warm-up then cosine decay, gradient clipping. accelerate runs the
same loop on CPU, one GPU or several (``accelerate launch -m flash train ...``).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from flash.draft import DraftConfig, DraftError, FlashDraft, vocab_columns
from flash.training.config import TrainConfig
from flash.training.distill import Record


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where bfloat16 matmuls are native (a CUDA GPU that supports them; a CPU
    with AVX512-BF16 or AMX, where oneDNN's bf16 matmuls are native, though a whole training step of the
    default draft gained only ~1.3x there), else ``"no"``: elsewhere bfloat16 is emulated and slower than fp32.
    Other choices are returned as they are.
    """
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported")]
        return "bf16" if any(check() for check in native) else "no"
    return "no"


def get_lr(step: int, total: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr (a pure function of the step).

    ``progress`` (0..1) replaces the step-based position in the decay (a run trained for a time: the
    fraction of its time after the warm-up that has passed)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if progress is None:
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class _TimeBudget:
    """Where a run trained for ``minutes`` stands: the decay's progress after the warm-up, read on the
    main process and shared, so every process takes the same learning rates and stops at the same step."""

    def __init__(self, accelerator, minutes: float) -> None:
        self.accelerator, self.seconds = accelerator, minutes * 60
        self.start = time.perf_counter()
        self.warm_end: float | None = None  # seconds in, when the warm-up ended

    def progress(self, warming_up: bool) -> float:
        elapsed = time.perf_counter() - self.start
        if warming_up or self.warm_end is None:
            self.warm_end = elapsed
        value = (elapsed - self.warm_end) / max(1e-9, self.seconds - self.warm_end)
        if elapsed >= self.seconds:
            value = 1.0  # a warm-up longer than the whole budget still stops
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            value = float(broadcast(torch.tensor([value], device=self.accelerator.device), from_process=0)[0])
        return value


def draft_vocabulary(records: list[Record], size: int, eos_ids, vocab_size: int, keep=()) -> torch.Tensor:
    """The ``size`` most frequent response tokens, EOS always in, sorted (EAGLE-3's reduced head).

    ``keep``: tokens always in as well (a saved draft's vocabulary that this one grows). With fewer
    distinct tokens than ``size``, the lowest unused ids fill the rest.
    """
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = Counter(t for r in records for t in r.response.tolist())
    chosen = set(eos_ids)
    if keep:  # the most frequent of the tokens not kept yet
        chosen |= set(keep)
        for token, _ in counts.most_common():
            if len(chosen) >= size:
                break
            chosen.add(token)
    else:  # the rule the shipped drafts were made with (EOS counts against the frequent ones)
        chosen |= {t for t, _ in counts.most_common(size - len(chosen))}
    filler = (t for t in range(vocab_size) if t not in chosen)
    while len(chosen) < size:
        chosen.add(next(filler))
    return torch.tensor(sorted(chosen))


def _sample_tensors(draft: FlashDraft, rec: Record, noise: float, device) -> tuple[torch.Tensor, ...]:
    """(stream [S, D], gate h [n, D], target h [n, D]: h_{t+1} for each trained position t) for one record."""
    ids = torch.cat([rec.prompt_ids, rec.response]).to(device)
    hidden = rec.hidden.to(device=device, dtype=torch.float32)
    if noise > 0:
        hidden_in = hidden + (torch.rand_like(hidden) * 2 - 1) * noise * hidden.std()
    else:
        hidden_in = hidden
    L, F_ = rec.prompt_ids.shape[0], ids.shape[0]
    prompt_stream, _ = draft.prompt_stream(ids[:L], rec.media_spans, hidden_in[:L], int(ids[L]))
    # Response positions t = L-1 .. F-2: f_t = fuse(h_t, e_{t+1}).
    resp = draft.fuse_features(hidden_in[L - 1 : F_ - 1], draft.embed(ids[L:F_]))
    stream = torch.cat([prompt_stream, resp])
    return stream, hidden_in[L - 1 : F_ - 1], hidden[L:F_]


def rules_in_draft_vocab(rules, response: list[int], draft_to_target: torch.Tensor,
                         vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's logits rules as masks over the draft vocabulary, for every prefix of ``response``.

    Returns (seen, banned), both [R+1, Vd] bool: row j is for the logits that follow
    ``response[:j]``; ``seen`` marks tokens the repetition penalty applies to, ``banned`` tokens the
    no-repeat-n-gram rule forbids. Same rules as :meth:`LogitsRules.apply` (tested against it).
    """
    size_d, length = draft_to_target.numel(), len(response)
    index = vocab_columns(draft_to_target.cpu(), vocab_size)
    seen = torch.zeros(length + 1, size_d, dtype=torch.bool)
    banned = torch.zeros(length + 1, size_d, dtype=torch.bool)
    ids = index[torch.tensor(response, dtype=torch.long)] if response else torch.zeros(0, dtype=torch.long)
    if rules.repetition_penalty != 1.0 and length:
        known = ids >= 0
        onehot = torch.zeros(length, size_d)
        onehot[torch.arange(length)[known], ids[known]] = 1
        seen[1:] = onehot.cumsum(0) > 0
    if rules.no_repeat_ngram_size > 0:
        for j, ban in enumerate(rules.ngram_bans(response, range(length + 1))):
            columns = [c for c in index[ban].tolist() if c >= 0] if ban else []  # in the draft vocabulary
            if columns:
                banned[j, columns] = True
    return seen, banned


def apply_rule_masks(logits: torch.Tensor, seen: torch.Tensor, banned: torch.Tensor, penalty: float) -> torch.Tensor:
    """Logits [n, Vd] processed like :meth:`LogitsRules.apply`; banned entries get -1e4, not -inf.

    Finite, so a soft cross-entropy term ``0 * log q`` at a banned token stays 0 instead of NaN.
    """
    if penalty != 1.0:
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    return logits.masked_fill(banned, -1e4)


def record_loss(draft: FlashDraft, rec: Record, cfg: TrainConfig, device, noise: float | None = None, rules=None,
                loss_rules=None):
    """Loss of one record and per-slot greedy hits (teacher forcing).

    A hit means the draft's top token is the token the target actually emitted next. With
    ``rules`` (the target's logits rules) the draft's logits are processed as at decoding time,
    with the true prefix, so the hit rate predicts real acceptance. With ``loss_rules`` the
    cross-entropy compares the draft's and the target's rule-processed logits (``cfg.rules_ce``).
    """
    stream, gate, targets = _sample_tensors(draft, rec, cfg.noise if noise is None else noise, device)
    preds = draft.train_forward(stream, gate)  # [k, n, D]
    n = gate.shape[0]
    response = rec.response.to(device)
    masks = None
    if loss_rules is not None and loss_rules.active:
        seen, banned = rules_in_draft_vocab(loss_rules, rec.response.tolist(), draft.draft_to_target,
                                            draft.cfg.vocab_size)
        masks = seen.to(device), banned.to(device)
    # Slot i's targets are rows i.. of the same h (and of the same rule masks, row r following the
    # prefix response[:1+r]): the target's side of the cross-entropy is computed once for all slots.
    # The target's side in fp32 even under autocast: its near-tied logits are what the draft must rank.
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        target_logits = draft.draft_logits(targets)
        if masks is not None:
            target_logits = apply_rule_masks(target_logits, masks[0][1:], masks[1][1:], loss_rules.repetition_penalty)
        target_probs = (target_logits / cfg.teacher_temperature).softmax(-1)
    total, hits = 0.0, []
    for i in range(draft.cfg.k):
        valid = n - i  # slot i at position t predicts h_{t+1+i}: needs t+1+i <= F-1
        if valid <= 0:
            hits.append(torch.zeros(0, dtype=torch.bool, device=device))
            continue
        pred, tgt = preds[i, :valid], targets[i : i + valid]
        reg = F.smooth_l1_loss(pred, tgt)
        draft_logits = draft.draft_logits(pred).float()  # bf16 under autocast: the rules and softmax in fp32
        ce_draft = draft_logits
        if masks is not None:  # row r follows the prefix response[:1+i+r]
            rows = slice(1 + i, 1 + i + valid)
            ce_draft = apply_rule_masks(draft_logits, masks[0][rows], masks[1][rows], loss_rules.repetition_penalty)
        ce = -(target_probs[i : i + valid] * ce_draft.log_softmax(-1)).sum(-1).mean()
        total = total + cfg.slot_decay**i * (reg + cfg.ce_weight * ce)
        actual = torch.cat([response, response.new_tensor([-1])])[1 + i : 1 + i + valid]
        with torch.no_grad():
            hits.append(_top_tokens(draft, draft_logits.detach(), rules, rec.response.tolist(), 1 + i) == actual)
    return total / sum(cfg.slot_decay**i for i in range(draft.cfg.k)), hits


def _top_tokens(draft: FlashDraft, draft_logits: torch.Tensor, rules, response: list[int], start: int) -> torch.Tensor:
    """Draft's greedy tokens (target ids); row r processed by ``rules`` with prefix response[:start+r]."""
    if rules is None or not rules.active:
        return draft.to_target_ids(draft_logits.argmax(-1))
    full = draft.to_target_vocab(draft_logits.float(), float("-inf"))
    return rules.apply(full, response, start).argmax(-1)


def chain_tau(hits: list[torch.Tensor], k: int) -> tuple[float, list[float]]:
    """Teacher-forced τ: mean over positions of 1 + the run of consecutive slot hits; per-slot hit rates."""
    n = hits[0].shape[0]
    run = torch.ones(n, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    for i in range(k):
        h = torch.zeros(n, dtype=torch.bool)
        h[: hits[i].shape[0]] = hits[i].cpu()
        alive &= h
        run += alive.long()
    rates = [float(h.float().mean()) if h.numel() else 0.0 for h in hits]
    return float(run.float().mean()), rates


def evaluate(draft: FlashDraft, records: list[Record], cfg: TrainConfig, device, rules=None) -> dict:
    """Held-out loss, teacher-forced τ and per-slot hit rate, for images and videos separately."""
    draft.eval()
    out: dict = {}
    with torch.no_grad():
        for kind in ("image", "video"):
            recs = [r for r in records if r.kind == kind]
            if not recs:
                continue
            taus, rates, losses, weights = [], [], [], []
            for rec in recs:
                loss, hits = record_loss(draft, rec, cfg, device, noise=0.0, rules=rules,
                                         loss_rules=rules if cfg.rules_ce else None)
                tau, r = chain_tau(hits, draft.cfg.k)
                taus.append(tau)
                rates.append(r)
                losses.append(float(loss))
                weights.append(hits[0].shape[0])
            w = torch.tensor(weights, dtype=torch.float32)
            slot_rates = (torch.tensor(rates) * w[:, None]).sum(0) / w.sum()
            out[kind] = {"tau": float((torch.tensor(taus) * w).sum() / w.sum()),
                         "slot_hit_rate": [round(float(x), 3) for x in slot_rates],
                         "loss": sum(losses) / len(losses), "records": len(recs)}
    draft.train()
    return out


def _average_gradients(accelerator, model: torch.nn.Module) -> None:
    """Average gradients over processes (several GPUs or CPU processes under ``accelerate launch``).

    Done by hand because the loss is not computed through a module ``forward`` (it walks records of
    different shapes), so DistributedDataParallel's hooks would never fire.
    """
    if accelerator.num_processes == 1:
        return
    # One flat all-reduce, not one per parameter tensor: each collective has a fixed cost.
    params = list(model.parameters())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    for p, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = grad.view_as(p)


def _continue_from(draft: FlashDraft, path: Path, records: list[Record] = (), eos_ids=()) -> None:
    """Load a saved draft's weights, its draft vocabulary included, into ``draft``.

    The shapes must match, except that ``draft`` may have more decoder blocks or a larger draft
    vocabulary. Each extra block starts as the identity (its residual branches output zero); a larger
    vocabulary keeps the saved one's tokens and adds the most frequent others in ``records`` (the head's
    rows are the target's, so the new tokens need no weights). Either way the grown draft starts out
    predicting what the saved one does.
    """
    saved = FlashDraft.load(path)
    theirs, ours = asdict(saved.cfg), asdict(draft.cfg)
    differ = [name for name in ours if theirs[name] != ours[name] and name not in ("num_layers", "draft_vocab_size")]
    if saved.cfg.num_layers > draft.cfg.num_layers:
        differ.append("num_layers")
    saved_size = saved.cfg.draft_vocab_size or saved.cfg.vocab_size
    size = draft.cfg.draft_vocab_size or draft.cfg.vocab_size
    if saved_size > size:
        differ.append("draft_vocab_size")
    if differ:  # DraftError: the CLI prints it as one line (a user's flags, not a bug)
        raise DraftError(f"cannot continue from {path}: it has "
                         + ", ".join(f"{name} {theirs[name]} where this run has {ours[name]}" for name in differ)
                         + " (train with its settings, e.g. --draft-vocab; only num_layers and the draft "
                           "vocabulary may grow)")
    # The vocabulary comes with the state dict (train() does not recompute it), grown if asked.
    state = saved.state_dict()
    vocab = state.pop("draft_to_target")
    if size > saved_size:
        vocab = draft_vocabulary(records, size, eos_ids, draft.cfg.vocab_size, keep=vocab.tolist())
    draft.register_buffer("draft_to_target", vocab, persistent=True)
    missing, unexpected = draft.load_state_dict(state, strict=False)
    extra = [f"blocks.{i}." for i in range(saved.cfg.num_layers, draft.cfg.num_layers)]
    missing = [n for n in missing if n != "draft_to_target"]  # set just above
    assert not unexpected and all(any(n.startswith(p) for p in extra) for n in missing), (missing, unexpected)
    with torch.no_grad():
        for block in draft.blocks[saved.cfg.num_layers :]:
            block.o_proj.weight.zero_()
            block.down.weight.zero_()


def train(target, records: list[Record], out_dir: Path, cfg: TrainConfig = TrainConfig(),
          log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> FlashDraft:
    """Train a draft for ``target`` on distilled ``records``; save it (and a log) to ``out_dir``."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import parse_flag_from_env

    # The device decides "auto"; Accelerator would read ACCELERATE_USE_CPU itself, PartialState must be told.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = resolve_mixed_precision(cfg.mixed_precision, state.device)
    # torch.autocast rather than Accelerator(mixed_precision=...): accelerate's state is one per process
    # and refuses a second train() with another precision.
    accelerator = Accelerator()
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    train_recs = [r for r in records if r.split == "train"]
    heldout = [r for r in records if r.split == "heldout"]
    if not train_recs:
        raise ValueError("no training records: run the distillation step first")
    dcfg = DraftConfig(target_name=target.name, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                       num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, k=cfg.k,
                       num_latents=cfg.num_latents, num_layers=cfg.num_layers,
                       draft_vocab_size=0 if cfg.draft_vocab_size >= target.vocab_size else cfg.draft_vocab_size)
    draft = FlashDraft(dcfg)
    if dcfg.draft_vocab_size and not cfg.init_from:
        vocab = draft_vocabulary(train_recs, dcfg.draft_vocab_size, target.eos_token_ids, target.vocab_size)
        draft.register_buffer("draft_to_target", vocab, persistent=True)
    if cfg.init_from:
        _continue_from(draft, Path(cfg.init_from), train_recs, target.eos_token_ids)
    else:
        with torch.no_grad():  # h's per-dimension RMS: the scale the output norm starts from
            sample = torch.cat([r.hidden[:: max(1, r.hidden.shape[0] // 64)].float() for r in train_recs])
            draft.out_norm.weight.copy_(sample.pow(2).mean(0).sqrt())
    model = draft.to(device).bind(target)
    loss_rules = target.logits_rules() if cfg.rules_ce else None
    optimizer = accelerator.prepare(
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0))
    # Equal shards: every process must take the same number of steps, or a gradient sync never returns.
    per_process = len(train_recs) // accelerator.num_processes or len(train_recs)
    shard = train_recs[accelerator.process_index :: accelerator.num_processes][:per_process]
    total_steps = cfg.epochs * math.ceil(len(shard) / cfg.grad_accum)
    budget = _TimeBudget(accelerator, cfg.minutes) if cfg.minutes else None
    rng = random.Random(cfg.seed)
    if accelerator.is_main_process:
        log(f"training on {device} ({accelerator.num_processes} process(es)), "
            f"{'bf16 autocast' if precision == 'bf16' else 'fp32'}"
            + (f", for {cfg.minutes:.1f} minutes" if budget else ""))
    step, history, start, time_up = 0, [], time.perf_counter(), False
    epochs = itertools.count() if budget else range(cfg.epochs)
    for epoch in epochs:
        order = list(shard)
        rng.shuffle(order)
        running, seen = 0.0, 0
        for i, rec in enumerate(order):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = record_loss(model, rec, cfg, device, loss_rules=loss_rules)
            accelerator.backward(loss / cfg.grad_accum)
            running, seen = running + float(loss.detach()), i + 1
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(order):
                progress = budget.progress(step < cfg.warmup_steps) if budget else None
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(step, total_steps, cfg, progress)
                _average_gradients(accelerator, model)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                time_up = progress is not None and progress >= 1.0
            if (i + 1) % 50 == 0 and accelerator.is_main_process:
                of = f" of {budget.seconds:.0f}" if budget else ""
                log(f"epoch {epoch + 1}{'' if budget else f'/{cfg.epochs}'} record {i + 1}/{len(order)} "
                    f"loss {running / (i + 1):.4f} ({time.perf_counter() - start:.0f} s{of})")
            if time_up:
                break
        # Held-out metrics on the main process only; the others wait at the next gradient sync.
        metrics = (evaluate(model, heldout, cfg, device, target.logits_rules())
                   if heldout and accelerator.is_main_process else {})
        history.append({"epoch": epoch + 1, "train_loss": running / seen, "heldout": metrics,
                        "seconds": round(time.perf_counter() - start, 1), "lr": optimizer.param_groups[0]["lr"]})
        if seen < len(order):
            history[-1]["records"] = seen  # the time ran out part-way through this epoch
        if accelerator.is_main_process:
            log(f"epoch {epoch + 1}: train loss {running / seen:.4f} heldout {json.dumps(metrics)}")
            model.save(out_dir)  # checkpoint every epoch: an interrupted run keeps its best-so-far
            run_log = {"config": asdict(cfg), "mixed_precision": precision, "history": history}
            (out_dir / "training_log.json").write_text(json.dumps(run_log, indent=2) + "\n")
        if time_up:
            break
    if accelerator.num_processes > 1:
        # The main process saves last: the others wait for it, then every process leaves the process group
        # together. A process that exited while another was still in it aborted (SIGABRT) now and then.
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return model.eval()
