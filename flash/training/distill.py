"""Self-distillation data: the target writes its own responses, and its hidden states are recorded.

Each record is one safetensors file (prompt ids, media spans, response ids, and h over prompt +
response in fp16), named by item id and mode, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flash.engine import GenerationConfig
from flash.engine.sampling import choose_token
from flash.engine.verification import make_generator
from flash.targets.base import Prompt, TargetModel
from flash.training.corpus import CorpusItem, MediaFileItem

#: With a deadline, frame counts are batched together only within blocks of this many batches.
_DEADLINE_BLOCK = 8


@dataclass(frozen=True)
class Record:
    """One distilled sample (tensors on CPU)."""

    prompt_ids: torch.Tensor  # [L] long
    media_spans: tuple[tuple[int, int], ...]
    response: torch.Tensor  # [R] long
    hidden: torch.Tensor  # [L+R, D] float16: h over prompt and response
    split: str
    kind: str  # "image" or "video"


@torch.inference_mode()
def _decode_with_hidden(target: TargetModel, prompt: Prompt, config: GenerationConfig):
    """Plain decoding that keeps h: (response ids, h over prompt + response [L+R, D])."""
    generator = make_generator(config.seed, target.device)
    pre = target.prefill(prompt)
    hidden, logits, response = [pre.hidden], pre.last_logits[None], []
    while True:
        response.append(choose_token(config.rules.apply(logits, response, len(response))[0], config, generator))
        # Feed every token, the last one too: training needs h at the final position.
        logits, h = target.forward(pre.state, torch.tensor([[response[-1]]], device=target.device))
        hidden.append(h)
        if response[-1] in target.eos_token_ids or len(response) >= config.max_new_tokens:
            return response, torch.cat(hidden)


def _responses(target: TargetModel, prompts: list[Prompt], configs: list[GenerationConfig]):
    """The target's own responses and h over prompt + response; batched where the target can."""
    batch = getattr(target, "generate_batch", None)
    if batch is not None:
        return batch(prompts, configs)
    return [_decode_with_hidden(target, p, c) for p, c in zip(prompts, configs, strict=True)]


def _record(prompt: Prompt, response: list[int], hidden: torch.Tensor, split: str, kind: str) -> dict:
    spans = torch.tensor(prompt.media_spans, dtype=torch.int64).reshape(-1, 2)
    return {"prompt_ids": prompt.input_ids[0].cpu(), "media_spans": spans, "response": torch.tensor(response),
            "hidden": hidden.to(torch.float16).cpu().contiguous(), "split": split, "kind": kind}


def distill(target: TargetModel, items: list[CorpusItem | MediaFileItem], out_dir: Path, *, max_new_tokens: int = 160,
            sample_temperature: float = 0.7, batch_size: int = 16, seed: int = 0,
            shard: tuple[int, int] = (0, 1), deadline: float | None = None) -> int:
    """Write a greedy and a sampled record for each item into ``out_dir`` (resumable); returns how many
    records this call wrote.

    ``shard=(i, n)`` takes every n-th item from the i-th: n processes can fill one cache together.
    ``deadline`` (a ``time.time()``): no batch of training records starts that would, at the rate so
    far, end after it; the held-out records are always made (the evaluation split stays whole), and the
    training records made are about a prefix of the corpus (frame counts are grouped only within blocks
    of a few batches), so images and videos come in about its proportions.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rules = target.logits_rules()
    modes = {"greedy": GenerationConfig(max_new_tokens=max_new_tokens, rules=rules, seed=seed),
             "sampled": GenerationConfig(max_new_tokens=max_new_tokens, temperature=sample_temperature,
                                         top_p=0.95, rules=rules, seed=seed)}
    index, count = shard
    # A record already made for this target is kept (resumable); one made for another version of it
    # (its connector or prompt changed, so its name did) is made again.
    todo = [(item, mode) for item in items[index::count] for mode in modes
            if _distilled_for(out_dir / f"{item.item_id}-{mode}.safetensors") != target.name
            and not (item.split == "heldout" and mode == "sampled")]
    # A batch is left-padded to its longest prompt, and a video prompt is ~5x an image's: batching
    # media with the same number of frames together cuts the prefill's padded tokens ~2.3x on the
    # built-in corpus. Held-out items stay first (an interrupted run still has its evaluation split);
    # the sort is stable, so items keep their order otherwise. A run that may stop part-way groups
    # frame counts only within blocks of the corpus's order (without a deadline: one block).
    block = _DEADLINE_BLOCK * batch_size if deadline is not None else max(1, len(todo))

    def place(entry: tuple[int, tuple]) -> tuple[bool, int, int]:
        position, (item, _) = entry
        return item.split != "heldout", position // block, item.frame_count

    todo = [job for _, job in sorted(enumerate(todo), key=place)]
    # Held-out and training records never share a batch: a deadline stops only training batches.
    held = sum(item.split == "heldout" for item, _ in todo)
    batches = [todo[i : min(i + batch_size, held)] for i in range(0, held, batch_size)]
    batches += [todo[i : i + batch_size] for i in range(held, len(todo), batch_size)]
    start, done, tokens = time.perf_counter(), 0, 0
    for chunk in batches:
        if deadline is not None and chunk[0][0].split != "heldout":
            per_record = (time.perf_counter() - start) / done if done else 0.0
            if time.time() + per_record * len(chunk) > deadline:
                made = done - held
                print(f"distill: time is up: {made} of {len(todo) - held} training records made "
                      "(rerun without the time limit to add the rest)", file=sys.stderr, flush=True)
                return done
        # One Prompt object per item: its greedy and sampled rows share the prefill.
        prompts = {}
        for item, _ in chunk:
            if item.item_id not in prompts:
                prompts[item.item_id] = target.build_prompt(item.media, item.prompt)
        rows = [prompts[item.item_id] for item, _ in chunk]
        results = _responses(target, rows, [modes[mode] for _, mode in chunk])
        for (item, mode), prompt, (response, hidden) in zip(chunk, rows, results, strict=True):
            rec = _record(prompt, response, hidden, item.split, item.kind)
            meta = {"split": rec.pop("split"), "kind": rec.pop("kind"), "prompt": item.prompt, "target": target.name}
            final = out_dir / f"{item.item_id}-{mode}.safetensors"
            tmp = final.with_suffix(".part")
            save_file(rec, str(tmp), metadata={"meta": json.dumps(meta)})
            tmp.replace(final)  # atomic: an interrupted run never leaves a half-written record
            tokens += len(response)
        done += len(chunk)
        elapsed = time.perf_counter() - start
        print(f"distill: {done}/{len(todo)} records, {tokens} tokens ({done / elapsed:.2f} records/s, "
              f"~{(len(todo) - done) * elapsed / done:.0f} s left)", file=sys.stderr, flush=True)
    return done


def _distilled_for(path: Path) -> str | None:
    """The name of the target ``path``'s record was distilled from; None if there is no record."""
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()["meta"])["target"]


def load_records(data_dir: Path, target_name: str) -> list[Record]:
    """Read every record in ``data_dir`` that was distilled from ``target_name``."""
    records = []
    for path in sorted(Path(data_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:  # one open: the metadata decides, then the tensors
            meta = json.loads(fh.metadata()["meta"])
            if meta["target"] == target_name:
                records.append(_read_record(fh, meta))
    return records


def load_record(path: Path) -> Record:
    """One record file."""
    with safe_open(str(path), "pt") as fh:
        return _read_record(fh, json.loads(fh.metadata()["meta"]))


def _read_record(fh, meta: dict) -> Record:
    spans = tuple((int(a), int(b)) for a, b in fh.get_tensor("media_spans").tolist())
    return Record(fh.get_tensor("prompt_ids").long(), spans, fh.get_tensor("response").long(),
                  fh.get_tensor("hidden"), meta["split"], meta["kind"])
