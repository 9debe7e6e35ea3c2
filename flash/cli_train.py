"""``python -m flash train``: self-distillation data + draft training in one command."""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
import zlib
from pathlib import Path

from flash.model_names import DEFAULT_MODEL, distill_dir, is_embedded
from flash.training.config import MIXED_PRECISION, TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a FLASH draft for a target by self-distillation",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="'default' (Qwen2.5), 'smollm2' or a HuggingFace hub id")
    p.add_argument("--out", required=True, help="directory to write the draft into")
    p.add_argument("--data-dir", default=None, help="distillation cache (default: <cache>/distill/<model>)")
    p.add_argument("--media", nargs="*", default=[],
                   help="folders of your own images/videos (else the built-in corpus)")
    p.add_argument("--train-items", type=int, default=876, help="built-in corpus: training items")
    p.add_argument("--first-item", type=int, default=0,
                   help="built-in corpus: distil training items from this index on (the earlier ones, e.g. "
                        "those the draft you continue from was trained on, are skipped)")
    p.add_argument("--heldout-items", type=int, default=40, help="built-in corpus: held-out items")
    p.add_argument("--class-items", type=int, default=0,
                   help="embedded models: this many more training items, labelled with ImageNet's classes in turn "
                        "(captions of every subject the classifier can name), asking the model's default request")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--default-prompt-share", type=float, default=0.0,
                   help="built-in corpus: this share of items (chosen by id) asks the target's own default "
                        "request instead of the corpus's prompts, so the draft sees what the app asks")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs to train (None: 4, unless --train-minutes is given)")
    p.add_argument("--train-minutes", type=float, default=0.0,
                   help="train for this long instead of a number of epochs (the cosine decays over the time)")
    p.add_argument("--distill-minutes", type=float, default=0.0,
                   help="stop starting new training records this long after the command started (the "
                        "held-out ones are always made; 0 = no limit)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-latents", type=int, default=8, help="C latents per media span (0 = no compression)")
    p.add_argument("--num-layers", type=int, default=1, help="decoder blocks in the draft's SAR head")
    p.add_argument("--draft-vocab", type=int, default=4096, help="reduced draft vocabulary (0 = full)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad-accum", type=int, default=1, help="records per optimizer step")
    p.add_argument("--ce-weight", type=float, default=1.0, help="weight of the soft cross-entropy term")
    p.add_argument("--slot-decay", type=float, default=0.5,
                   help="slot i's loss weight is slot_decay**i (1 = plain mean over slots)")
    p.add_argument("--rules-ce", action="store_true",
                   help="cross-entropy on the logits after the target's logits rules (what picks the token)")
    p.add_argument("--teacher-temperature", type=float, default=1.0,
                   help="the cross-entropy's target is softmax(target logits / this); < 1 sharpens it")
    p.add_argument("--noise", type=float, default=0.05, help="uniform feature noise, relative to h's std")
    p.add_argument("--max-train-records", type=int, default=0,
                   help="train on at most this many training records (0 = all; for equal-budget ablations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", default="", metavar="DRAFT",
                   help="continue training this saved draft (same shape, or fewer --num-layers: extra blocks "
                        "start as the identity; keeps its draft vocabulary)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no",
                   help="bf16: the draft's matmuls in bfloat16 under autocast (weights and metrics stay fp32); "
                        "auto: bf16 where the GPU or CPU computes it natively (CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--batch-size", type=int, default=32, help="distillation rows decoded together")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="distil only every N-th item from the I-th (run N processes to fill one cache)")
    p.add_argument("--distill-only", action="store_true", help="only build the distillation cache")
    p.add_argument("--train-only", action="store_true", help="train on the records already in the cache")
    p.set_defaults(func=cmd_train)


def _user_corpus(folders: list[str], seed: int):
    """(media file, prompt) items from the user's folders; a tenth held out.

    Each file is decoded once here (unreadable ones are skipped with a message) and again when it
    is distilled: its frames are not kept, so any number of files fits in memory.
    """
    from flash.media import MediaError, load_media
    from flash.training.corpus import IMAGE_PROMPTS, VIDEO_PROMPTS, MediaFileItem

    rng = random.Random(seed)
    items = []
    files = sorted(f for folder in folders for f in Path(folder).rglob("*") if f.is_file())
    for i, path in enumerate(files):
        try:
            media = load_media(path)
        except MediaError as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        prompts = VIDEO_PROMPTS if media.kind == "video" else IMAGE_PROMPTS
        items.append(MediaFileItem(f"user-{i:05d}", path, rng.choice(prompts), "heldout" if i % 10 == 9 else "train",
                                   media.kind, len(media.frames)))
    return items


def _chosen(item_id: str, share: float) -> bool:
    """Whether ``item_id`` falls in ``share`` of all ids: a stable hash, the same in every process."""
    return zlib.crc32(item_id.encode()) % 10_000 < share * 10_000


def _with_default_prompt(item, target):
    """``item`` asking ``target``'s default request for its kind of media (items have a ``kind`` as media do)."""
    return dataclasses.replace(item, prompt=target.default_prompt(item))


def cmd_train(args) -> int:
    from flash.cli import UsageError, quiet_transformers

    started = time.time()  # --distill-minutes counts from here: building the corpus takes part of it
    if args.train_minutes and args.epochs is not None:
        raise UsageError("give --epochs or --train-minutes, not both")
    if args.train_minutes < 0 or args.distill_minutes < 0:
        raise UsageError("--train-minutes and --distill-minutes must be >= 0")
    if args.media and args.first_item:
        raise UsageError("--first-item counts the built-in corpus's items; it does not apply to --media")
    if args.class_items and (args.class_items < 0 or not is_embedded(args.model) or args.media):
        raise UsageError("--class-items labels the built-in corpus's media with ImageNet's classes: "
                         "embedded models only, without --media")
    parts = args.shard.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
        raise UsageError(f"--shard must look like I/N with 0 <= I < N, not '{args.shard}'")
    shard = (int(parts[0]), int(parts[1]))
    if not 0 <= args.default_prompt_share <= 1:
        raise UsageError("--default-prompt-share must be between 0 and 1")
    try:
        cfg = TrainConfig(k=args.k, num_latents=args.num_latents, num_layers=args.num_layers,
                          draft_vocab_size=args.draft_vocab, epochs=4 if args.epochs is None else args.epochs,
                          minutes=args.train_minutes,
                          lr=args.lr, grad_accum=args.grad_accum, ce_weight=args.ce_weight, noise=args.noise,
                          slot_decay=args.slot_decay, rules_ce=args.rules_ce,
                          teacher_temperature=args.teacher_temperature, seed=args.seed, init_from=args.init_from,
                          mixed_precision=args.mixed_precision)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # torch, the target and the draft load only now that the arguments are checked.
    from flash.draft import read_draft_config
    from flash.models import load_target
    from flash.training.corpus import build_corpus, class_items
    from flash.training.distill import distill, load_records
    from flash.training.trainer import train

    quiet_transformers()
    target = load_target(args.model)
    if args.init_from:  # before distilling or reading gigabytes of records: a wrong path fails at once
        saved = read_draft_config(args.init_from)  # its config only: train() reads the weights once
        if saved.target_name != target.name:
            raise UsageError(f"--init-from {args.init_from}: that draft was trained for "
                             f"'{saved.target_name}', not this model ('{target.name}')")
    data_dir = Path(args.data_dir) if args.data_dir else distill_dir(args.model)
    if args.train_only:
        items = []
    elif args.media:
        items = _user_corpus(args.media, args.seed)
    else:
        # Items are drawn in sequence from one seed, so item i is the same whatever the count; this
        # process keeps only its shard's media in memory.
        items = build_corpus(args.train_items, args.heldout_items, seed=args.seed, first_item=args.first_item,
                             shard=shard)
        if args.class_items:
            labelled = class_items(args.class_items, args.seed, shard=shard)
            items += [_with_default_prompt(item, target) for item in labelled]
    if not items and not args.train_only:
        raise UsageError("no usable media to train on; pass --media FOLDER with images or videos")
    if args.default_prompt_share:
        items = [_with_default_prompt(item, target) if _chosen(item.item_id, args.default_prompt_share) else item
                 for item in items]
    if not args.train_only:
        print(f"distilling {len(items)} items into {data_dir} ...", file=sys.stderr)
        distill(target, items, data_dir, max_new_tokens=args.max_new_tokens, seed=args.seed,
                batch_size=args.batch_size, shard=shard if args.media else (0, 1),  # the corpus is sharded
                deadline=started + 60 * args.distill_minutes if args.distill_minutes else None)
    if args.distill_only:
        return 0
    records = load_records(data_dir, target.name)
    if not records:
        raise UsageError(f"no distilled records for this model in {data_dir}; run without --train-only first")
    if args.max_train_records:
        train_part = [r for r in records if r.split == "train"][: args.max_train_records]
        records = train_part + [r for r in records if r.split != "train"]
    print(f"training on {len(records)} records from {data_dir}", file=sys.stderr)
    train(target, records, Path(args.out), cfg)
    print(f"draft saved to {args.out}", file=sys.stderr)
    return 0
