"""Equal-budget probes of draft ideas for the default model (docs/training.md).

Each probe trains a draft the way ``python -m flash train --rules-ce`` does (CLI defaults) on the
same budget -- 400 training records of the distillation cache, 2 epochs, one process -- changing one
thing, and writes its held-out log to OUT/training_log.json:

- ``base``: as is (the cache's first 400 training records by name: its first 200 items, greedy +
  sampled);
- ``layer:N``: the draft's decoder block starts as the target's layer N (9 heads of 64 and the
  target's RoPE base, so the shapes match; grouped k/v heads repeated);
- ``ce:W``: ``--ce-weight W``;
- ``multilayer``: EAGLE-3's fused features -- the draft's hidden input is [h; layer 3's output;
  layer 15's output], each RMS-normalised, not h alone (needs ``--extract`` first);
- ``greedy-only``: 400 greedy records (the first 400 items) instead of 200 items' greedy + sampled.

``--extract`` computes the multilayer probe's features: each record's prompt is rebuilt from the
(deterministic) corpus and prompt + response run through the target once, teacher-forced; its last
layer is checked against the record's h. Run: ``python research/draft_probes.py VARIANT OUT [--seed S]``.
"""

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flash.training.trainer as training  # noqa: E402
from flash.draft import FlashDraft, RMSNorm  # noqa: E402
from flash.models import distill_dir, load_target  # noqa: E402
from flash.training.distill import load_record  # noqa: E402
from flash.weights import cache_dir  # noqa: E402

RECORDS, EPOCHS = 400, 2
FEATURE_LAYERS = (3, 15)  # a low and a middle layer of SmolLM2's 30 (EAGLE-3 fuses low, middle, high)
DATA = distill_dir("smollm2")  # the probes are on SmolLM2 (the default model then) and its layers


def _save_output(into: dict, name: str, module, inputs, output) -> None:
    """A forward hook's body: keep a decoder block's output [1, n, D] as ``into[name]`` [n, D] (fp16)."""
    into[name] = output[0].half().contiguous()


def extract(target, out: Path) -> None:
    """Save FEATURE_LAYERS' outputs (fp16) along the probes' records into ``out``."""
    from flash.training.corpus import build_corpus

    out.mkdir(parents=True, exist_ok=True)
    lean, worst, start = target._lean, 0.0, time.perf_counter()  # the default model's own pieces
    items = build_corpus(RECORDS // 2, 40, seed=0)  # held-out items, then the base's training items
    for i, item in enumerate(items):
        prompt = None
        for mode in ("greedy", "sampled"):
            path = DATA / f"{item.item_id}-{mode}.safetensors"
            if not path.exists() or (out / path.name).exists():
                continue
            rec = load_file(str(path))
            prompt = prompt or target.build_prompt(item.media, item.prompt)
            if not torch.equal(prompt.input_ids[0], rec["prompt_ids"]):
                sys.exit(f"error: {path.name} was not distilled from this corpus item")
            feats = {}
            hooks = [lean.layers[layer].register_forward_hook(functools.partial(_save_output, feats, f"layer{layer}"))
                     for layer in FEATURE_LAYERS]
            try:  # the model's own forward, teacher-forced over prompt + response
                with torch.inference_mode():  # as before: no autograd graph through the embedding lookups
                    x = torch.cat([target._prompt_embeds(prompt), target.embed(rec["response"][None])], 1)
                    last = lean(target._new_cache(), inputs_embeds=x)[0]
            finally:
                for hook in hooks:
                    hook.remove()
            h = rec["hidden"].float()
            worst = max(worst, float((last - h).abs().max() / h.abs().max()))
            save_file(feats, str(out / path.name))
        if i % 40 == 0:
            print(f"extract: {i}/{len(items)} items, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"extract: done; last layer vs the records' h: max relative difference {worst:.4f}", file=sys.stderr)


class MultiLayerDraft(FlashDraft):
    """The hidden input is [h; low; mid] (each normalised); compression and the gate use h alone."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        d = cfg.hidden_size
        self.low_norm, self.mid_norm = RMSNorm(d, cfg.rms_eps), RMSNorm(d, cfg.rms_eps)
        self.fuse = nn.Linear(4 * d, d, bias=False)

    def fuse_features(self, hidden, next_embeds):
        d, hidden = self.cfg.hidden_size, hidden.to(next_embeds.dtype)
        parts = [self.embed_norm(next_embeds), self.hidden_norm(hidden[..., :d]),
                 self.low_norm(hidden[..., d : 2 * d]), self.mid_norm(hidden[..., 2 * d :])]
        return self.fuse(torch.cat(parts, -1))

    def compress(self, span_hidden):
        return super().compress(span_hidden[..., : self.cfg.hidden_size])


def multilayer_sample_tensors(extra: dict):
    """training._sample_tensors with the extra layers appended to h (noise relative to each part)."""

    def sample_tensors(draft, rec, noise, device):
        ids = torch.cat([rec.prompt_ids, rec.response]).to(device)
        hidden = rec.hidden.to(device=device, dtype=torch.float32)
        d = hidden.shape[-1]
        full = torch.cat([hidden, extra[id(rec)].float()], -1)
        if noise > 0:
            stds = torch.cat([full[..., i : i + d].std().expand(d) for i in range(0, full.shape[-1], d)])
            full = full + (torch.rand_like(full) * 2 - 1) * noise * stds
        L, F_ = rec.prompt_ids.shape[0], ids.shape[0]
        prompt_stream, _ = draft.prompt_stream(ids[:L], rec.media_spans, full[:L], int(ids[L]))
        resp = draft.fuse_features(full[L - 1 : F_ - 1], draft.embed(ids[L:F_]))
        return torch.cat([prompt_stream, resp]), full[L - 1 : F_ - 1, :d], hidden[L:F_]

    return sample_tensors


def from_target_layer(n: int):
    """A draft factory whose block starts as the target's layer ``n`` (transformers' fp32 weights)."""
    from transformers import AutoModelForCausalLM

    layer = AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m-instruct",
                                                 dtype=torch.float32).model.layers[n]
    attn, mlp = layer.self_attn, layer.mlp

    def mha(weight):  # [kv heads * head_dim, D] -> each kv head repeated for its group of q heads
        groups = attn.q_proj.out_features // attn.k_proj.out_features
        return weight.view(-1, attn.head_dim, weight.shape[1]).repeat_interleave(groups, 0).flatten(0, 1)

    def factory(cfg):
        draft = FlashDraft(dataclasses.replace(cfg, num_heads=attn.q_proj.out_features // attn.head_dim,
                                               rope_theta=layer.self_attn.config.rope_parameters["rope_theta"]))
        block = draft.blocks[0]
        with torch.no_grad():
            block.qkv.weight.copy_(torch.cat([attn.q_proj.weight, mha(attn.k_proj.weight), mha(attn.v_proj.weight)]))
            block.o_proj.weight.copy_(attn.o_proj.weight)
            block.gate_up.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            block.down.weight.copy_(mlp.down_proj.weight)
            block.attn_norm.weight.copy_(layer.input_layernorm.weight)
            block.mlp_norm.weight.copy_(layer.post_attention_layernorm.weight)
        return draft

    return factory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("variant", help="base | layer:N | ce:W | multilayer | greedy-only")
    parser.add_argument("out", help="directory for the probe's draft and training_log.json")
    parser.add_argument("--extract", action="store_true", help="first compute the multilayer probe's features")
    parser.add_argument("--seed", type=int, default=0, help="training seed (initialisation, order, noise)")
    args = parser.parse_args()
    target = load_target("smollm2", quiet=True)
    features = cache_dir() / "probes" / "multilayer"
    if args.extract:
        extract(target, features)
    names = sorted(p.name for p in DATA.glob("*.safetensors"))
    train = [n for n in names if n.startswith("train-")]
    if args.variant == "greedy-only":
        train = [n for n in train if n.endswith("-greedy.safetensors")]
    chosen = train[:RECORDS] + [n for n in names if n.startswith("heldout-")]
    by_name = {n: load_record(DATA / n) for n in chosen}
    cfg = training.TrainConfig(k=4, num_latents=8, num_layers=1, draft_vocab_size=4096, epochs=EPOCHS, lr=1e-3,
                               grad_accum=1, ce_weight=1.0, noise=0.05, slot_decay=0.5, rules_ce=True, seed=args.seed)
    if args.variant.startswith("ce:"):
        cfg = dataclasses.replace(cfg, ce_weight=float(args.variant[3:]))
    elif args.variant.startswith("layer:"):
        training.FlashDraft = from_target_layer(int(args.variant[6:]))
    elif args.variant == "multilayer":
        try:
            extra = {id(by_name[n]): torch.cat([load_file(str(features / n))[f"layer{i}"] for i in FEATURE_LAYERS], -1)
                     for n in chosen}
        except FileNotFoundError:
            sys.exit("error: no multilayer features yet; run with --extract first")
        training.FlashDraft = MultiLayerDraft
        training._sample_tensors = multilayer_sample_tensors(extra)
    elif args.variant not in ("base", "greedy-only"):
        sys.exit(f"error: unknown variant '{args.variant}'")
    training.train(target, [by_name[n] for n in chosen], Path(args.out), cfg)


if __name__ == "__main__":
    main()
