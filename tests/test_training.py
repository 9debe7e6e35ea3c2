"""The trainer end to end on tiny random LLaVA / Qwen2.5-VL targets (a few steps), and its pure parts."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict

import pytest
import torch
from PIL import Image

from flash.draft import DraftConfig, DraftError, FlashDraft
from flash.engine import GenerationConfig, collect, generate
from flash.media import Media
from flash.training.corpus import CorpusItem
from flash.training.distill import Record, distill, load_records
from flash.training.trainer import TrainConfig, chain_tau, draft_vocabulary, get_lr, train


def items() -> list[CorpusItem]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    out = []
    for i, c in enumerate(colours):
        img = Image.new("RGB", (64, 64), c)
        media = Media(kind="image", frames=(img,), source=f"c{i}", size=img.size)
        out.append(CorpusItem(f"item-{i}", media, "Describe this image.", "heldout" if i == 3 else "train"))
    frames = tuple(Image.new("RGB", (64, 64), c) for c in colours)
    out.append(CorpusItem("video-0", Media(kind="video", frames=frames, source="v", size=(64, 64)),
                          "What happens?", "train"))
    return out


def prompts_built(target, monkeypatch) -> list[str]:
    """The media sources ``target.build_prompt`` is called with, in order (a list that fills as it runs)."""
    seen = []
    real = target.build_prompt

    def spy(media, text):
        seen.append(media.source)
        return real(media, text)

    monkeypatch.setattr(target, "build_prompt", spy)
    return seen


def test_distill_orders_held_out_first_then_by_frame_count(tiny_llava, tmp_path, monkeypatch):
    """A batch is padded to its longest prompt: media with the same number of frames are decoded
    together (the video last), and held-out items come first so an interrupted run can evaluate."""
    seen = prompts_built(tiny_llava, monkeypatch)
    distill(tiny_llava, items(), tmp_path / "data", max_new_tokens=4, batch_size=2)
    # Rows: c3 (held out: greedy only, a batch of its own), then c0..c2 greedy + sampled, then the
    # video; one prompt per distinct item in each batch of two rows.
    assert seen == ["c3", "c0", "c1", "c2", "v"]


def test_distill_with_a_deadline_keeps_the_corpus_order_and_the_held_out_split(tiny_llava, tmp_path, monkeypatch):
    """A run that may stop part-way batches frame counts together only within blocks, so what it makes
    is the corpus's first items (the video first here, as in the corpus); the held-out records are made
    even when the time is already up."""
    import time

    import flash.training.distill

    seen = prompts_built(tiny_llava, monkeypatch)
    monkeypatch.setattr(flash.training.distill, "_DEADLINE_BLOCK", 1)  # blocks of one batch (two rows)
    video_first = [items()[-1], *items()[:-1]]
    made = distill(tiny_llava, video_first, tmp_path / "late", max_new_tokens=4, batch_size=2, deadline=time.time())
    assert made == 1 and seen == ["c3"]
    assert [r.split for r in load_records(tmp_path / "late", tiny_llava.name)] == ["heldout"]
    seen.clear()
    made = distill(tiny_llava, video_first, tmp_path / "data", max_new_tokens=4, batch_size=2,
                   deadline=time.time() + 3600)
    assert made == 9 and seen == ["c3", "v", "c0", "c1", "c2"]


@pytest.mark.parametrize("target_fixture", ["tiny_llava", "tiny_qwen"])
def test_distill_train_and_decode_end_to_end(request, target_fixture, tmp_path):
    target = request.getfixturevalue(target_fixture)
    distill(target, items(), tmp_path / "data", max_new_tokens=12, batch_size=2)
    records = load_records(tmp_path / "data", target.name)
    assert {r.split for r in records} == {"train", "heldout"}
    assert all(r.hidden.shape[0] == r.prompt_ids.shape[0] + r.response.shape[0] for r in records)
    # Resumable: a second run finds everything done.
    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    distill(target, items(), tmp_path / "data", max_new_tokens=12, batch_size=2)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before

    cfg = TrainConfig(k=3, num_latents=2, num_heads=4, intermediate_size=64, draft_vocab_size=64, epochs=2,
                      warmup_steps=1, grad_accum=2)
    train(target, records, tmp_path / "draft", cfg, log=lambda m: None)
    log = json.loads((tmp_path / "draft" / "training_log.json").read_text())
    assert len(log["history"]) == 2 and "image" in log["history"][-1]["heldout"]
    draft = FlashDraft.load(tmp_path / "draft").bind(target)
    assert draft.cfg.draft_vocab_size == 64

    media = items()[3].media
    prompt = target.build_prompt(media, "Describe this image.")
    gen = GenerationConfig(max_new_tokens=16)
    ar = collect(generate(target, prompt, "ar", None, gen))
    assert collect(generate(target, prompt, "flash", draft, gen)).tokens == ar.tokens


def test_distill_remakes_records_of_another_version_of_the_target(tiny_llava, tmp_path, monkeypatch):
    """Resuming keeps the records made for this target; one made when the target had another name (its
    connector or prompt changed since) is made again, not kept and then silently left out of training."""
    distill(tiny_llava, items(), tmp_path / "data", max_new_tokens=4, batch_size=4)
    made = len(load_records(tmp_path / "data", tiny_llava.name))
    monkeypatch.setattr(tiny_llava, "name", tiny_llava.name + "-v2")
    assert load_records(tmp_path / "data", tiny_llava.name) == []
    seen = prompts_built(tiny_llava, monkeypatch)
    assert distill(tiny_llava, items(), tmp_path / "data", max_new_tokens=4, batch_size=4) == made
    assert len(load_records(tmp_path / "data", tiny_llava.name)) == made and seen
    assert distill(tiny_llava, items(), tmp_path / "data", max_new_tokens=4, batch_size=4) == 0


def test_training_reduces_the_loss(tiny_llava, tmp_path):
    distill(tiny_llava, items(), tmp_path / "data", max_new_tokens=16, batch_size=4)
    records = load_records(tmp_path / "data", tiny_llava.name)
    for r in records:  # evaluate on the training data itself: the loss must go down
        object.__setattr__(r, "split", "heldout") if r.split == "train" else None
    records += [Record(r.prompt_ids, r.media_spans, r.response, r.hidden, "train", r.kind) for r in records]
    cfg = TrainConfig(k=2, num_latents=2, num_heads=4, intermediate_size=64, draft_vocab_size=0, epochs=6,
                      warmup_steps=1, grad_accum=1, lr=3e-3, noise=0.0)
    train(tiny_llava, records, tmp_path / "draft", cfg, log=lambda m: None)
    hist = json.loads((tmp_path / "draft" / "training_log.json").read_text())["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


@pytest.fixture(scope="module")
def tiny_data(tiny_llava, tmp_path_factory):
    """One small distillation cache for the tiny LLaVA, shared by the tests that only read it."""
    data = tmp_path_factory.mktemp("tiny_data")
    distill(tiny_llava, items(), data, max_new_tokens=12, batch_size=4)
    return data


#: A small draft shape for tiny-target training tests.
SMALL = TrainConfig(k=2, num_latents=2, num_heads=4, intermediate_size=64, draft_vocab_size=64, epochs=1,
                    warmup_steps=1)


def test_lr_schedule_is_pure():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert get_lr(0, 100, cfg) == pytest.approx(1e-4)
    assert get_lr(9, 100, cfg) == pytest.approx(1e-3)
    assert get_lr(100, 100, cfg) == pytest.approx(1e-4)
    assert get_lr(55, 100, cfg) < get_lr(20, 100, cfg)
    # A run trained for a time: the decay follows the time's progress, the warm-up still the step.
    assert get_lr(3, 100, cfg, progress=0.9) == get_lr(3, 100, cfg)
    assert get_lr(20, 100, cfg, progress=0.0) == pytest.approx(1e-3)
    assert get_lr(20, 100, cfg, progress=0.5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert get_lr(20, 100, cfg, progress=1.0) == get_lr(20, 100, cfg, progress=7.0) == pytest.approx(1e-4)


def test_draft_vocabulary_keeps_frequent_tokens_and_eos():
    recs = [Record(torch.tensor([1]), (), torch.tensor([5, 5, 7, 9, 5, 7]), torch.zeros(7, 4), "train", "image")]
    vocab = draft_vocabulary(recs, 4, eos_ids={2}, vocab_size=50)
    assert vocab.tolist() == sorted(vocab.tolist()) and len(vocab) == 4
    assert {2, 5, 7}.issubset(set(vocab.tolist()))
    assert draft_vocabulary(recs, 0, {2}, 50).tolist() == list(range(50))


def test_chain_tau_counts_consecutive_hits():
    hits = [torch.tensor([True, True, False]), torch.tensor([True, False]), torch.tensor([True])]
    tau, rates = chain_tau(hits, 3)
    # position 0: slots 0,1,2 hit -> 4; position 1: slot 0 hit, slot 1 miss -> 2; position 2: miss -> 1
    assert tau == pytest.approx((4 + 2 + 1) / 3)
    assert rates == pytest.approx([2 / 3, 1 / 2, 1.0])


def test_batched_distillation_matches_plain_decoding(smollm2_target, photos):
    """generate_batch (shared prefill, finished rows leaving the batch) = the ar loop, token for token."""
    from flash.training.distill import _decode_with_hidden

    rules = smollm2_target.logits_rules()
    greedy = GenerationConfig(max_new_tokens=10, rules=rules)
    short = GenerationConfig(max_new_tokens=3, rules=rules)
    a = smollm2_target.build_prompt(photos["chelsea"], "Describe this image.")
    b = smollm2_target.build_prompt(photos["coffee"], "What is in this picture?")
    rows = smollm2_target.generate_batch([a, b, a], [greedy, greedy, short])
    for prompt, config, (response, hidden) in zip([a, b, a], [greedy, greedy, short], rows, strict=True):
        ref_response, ref_hidden = _decode_with_hidden(smollm2_target, prompt, config)
        assert response == ref_response
        assert hidden.shape == ref_hidden.shape == (prompt.length + len(response), smollm2_target.hidden_size)
        torch.testing.assert_close(hidden, ref_hidden, atol=2e-3, rtol=1e-3)
    assert rows[2][0] == rows[0][0][:3]  # the short row left the batch early, with the same start


@pytest.mark.slow
def test_two_cpu_processes_train_one_draft(tiny_data, tmp_path):
    """`torchrun --nproc_per_node 2` (accelerate's multi-process CPU mode): the processes average their
    gradients, so both end with the same draft, and it differs from one process seeing all records."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("multiprocess_train.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def run(*launcher: str, minutes: str = "0") -> list[dict]:
        out = subprocess.run([*launcher, str(script), str(tiny_data), str(tmp_path / "draft"), minutes], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533")
    two = run(*torchrun)
    one = run(sys.executable)
    assert sorted(r["rank"] for r in two) == [0, 1] and all(r["world"] == 2 for r in two)
    assert two[0]["checksum"] == pytest.approx(two[1]["checksum"], rel=1e-9)
    assert two[0]["checksum"] != pytest.approx(one[0]["checksum"], rel=1e-9)
    # Trained for a time, the main process's clock decides for both: the same rates, the same last step
    # (a process stopping alone would leave the other waiting in its gradient sync).
    timed = run(*torchrun, minutes="0.05")
    assert len(timed) == 2 and timed[0]["checksum"] == pytest.approx(timed[1]["checksum"], rel=1e-9)


def test_training_can_continue_from_a_saved_draft(tiny_llava, tiny_data, tmp_path):
    records = load_records(tiny_data, tiny_llava.name)
    cfg = SMALL
    train(tiny_llava, records, tmp_path / "first", cfg, log=lambda m: None)
    first = FlashDraft.load(tmp_path / "first")
    # lr so small that the weights cannot move visibly: continuing starts from the saved draft.
    again = TrainConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "first"), "lr": 1e-12})
    train(tiny_llava, records, tmp_path / "second", again, log=lambda m: None)
    second = FlashDraft.load(tmp_path / "second")
    for name, weight in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], weight, rtol=0, atol=1e-3)
    fresh = TrainConfig(**{**cfg.__dict__, "lr": 1e-12})  # a fresh start with the same tiny lr differs
    train(tiny_llava, records, tmp_path / "fresh", fresh, log=lambda m: None)
    fresh_qkv = FlashDraft.load(tmp_path / "fresh").blocks[0].qkv.weight
    assert not torch.allclose(fresh_qkv, first.blocks[0].qkv.weight, atol=1e-3)
    # More data later (a different frequent-token set) keeps the saved draft's vocabulary.
    assert torch.equal(second.draft_to_target, first.draft_to_target)
    fewer = [r for r in records if r.split != "train"] + [r for r in records if r.split == "train"][:1]
    fresh_vocab = draft_vocabulary([r for r in fewer if r.split == "train"], 64, tiny_llava.eos_token_ids,
                                   tiny_llava.vocab_size)
    assert not torch.equal(fresh_vocab, first.draft_to_target)  # so the check below means something
    train(tiny_llava, fewer, tmp_path / "fourth", again, log=lambda m: None)
    assert torch.equal(FlashDraft.load(tmp_path / "fourth").draft_to_target, first.draft_to_target)
    with pytest.raises(DraftError, match=r"cannot continue from .*: it has k \d+ where this run has 3 \("):
        train(tiny_llava, records, tmp_path / "third", TrainConfig(**{**again.__dict__, "k": 3}), log=lambda m: None)


def test_a_deeper_draft_grows_from_a_saved_one(tiny_llava, tiny_data, tmp_path):
    """--init-from a 1-block draft with --num-layers 2: the new block starts as the identity."""
    from flash.training.trainer import _continue_from

    records = load_records(tiny_data, tiny_llava.name)
    cfg = SMALL
    train(tiny_llava, records, tmp_path / "one", cfg, log=lambda m: None)
    shallow = FlashDraft.load(tmp_path / "one").bind(tiny_llava)  # saved weights are fp16-rounded
    deep = FlashDraft(DraftConfig(**{**asdict(shallow.cfg), "num_layers": 2}))
    _continue_from(deep, tmp_path / "one")
    deep = deep.eval().bind(tiny_llava)
    stream, gate = torch.randn(9, tiny_llava.hidden_size), torch.randn(3, tiny_llava.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(deep.train_forward(stream, gate), shallow.train_forward(stream, gate))
    assert not torch.equal(deep.blocks[1].qkv.weight, deep.blocks[0].qkv.weight)  # a real second block
    train(tiny_llava, records, tmp_path / "two", TrainConfig(**{**cfg.__dict__, "num_layers": 2,
                                                              "init_from": str(tmp_path / "one")}), log=lambda m: None)
    assert FlashDraft.load(tmp_path / "two").cfg.num_layers == 2
    # and never shallower
    with pytest.raises(DraftError, match="cannot continue from .*: it has num_layers 2 where this run has 1"):
        _continue_from(FlashDraft(shallow.cfg), tmp_path / "two")


@pytest.mark.parametrize(("penalty", "ngram"), [(1.2, 3), (1.0, 2), (1.5, 0)])
def test_rule_masks_in_the_draft_vocabulary_equal_the_target_rules(penalty, ngram):
    """rules_in_draft_vocab + apply_rule_masks == LogitsRules.apply, restricted to the draft's tokens."""
    from flash.engine.logits_rules import LogitsRules
    from flash.training.trainer import apply_rule_masks, rules_in_draft_vocab

    rules = LogitsRules(repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    gen = torch.Generator().manual_seed(0)
    vocab, draft_to_target = 50, torch.tensor(sorted(torch.randperm(50, generator=gen)[:20].tolist()))
    # A response that repeats itself (so n-grams recur) and uses tokens outside the draft vocabulary.
    response = torch.randint(0, 50, (8,), generator=gen).tolist() * 3 + [draft_to_target[0].item()] * 2
    seen, banned = rules_in_draft_vocab(rules, response, draft_to_target, vocab)
    assert seen.shape == banned.shape == (len(response) + 1, 20)
    assert (banned.any() if ngram else not banned.any()) and (seen.any() if penalty != 1.0 else not seen.any())
    logits = torch.randn(len(response) + 1, vocab, generator=gen) * 5
    want = torch.cat([rules.apply(logits[j : j + 1], response, j) for j in range(len(response) + 1)])
    got = apply_rule_masks(logits[:, draft_to_target], seen, banned, penalty)
    want = want[:, draft_to_target]
    finite = torch.isfinite(want)
    assert torch.equal(~finite, got == -1e4)
    torch.testing.assert_close(got[finite], want[finite])


def test_rules_ce_trains(tiny_llava, tiny_data, tmp_path):
    """--rules-ce: a finite loss with repetition penalty and n-gram ban active, and a draft that learns."""
    from flash.engine.logits_rules import LogitsRules
    from flash.training.trainer import record_loss

    records = load_records(tiny_data, tiny_llava.name)
    cfg = TrainConfig(**{**SMALL.__dict__, "epochs": 2, "rules_ce": True})
    draft = train(tiny_llava, records, tmp_path / "d", cfg, log=lambda m: None)
    rules = LogitsRules(repetition_penalty=1.3, no_repeat_ngram_size=2)
    with torch.no_grad():
        losses = [float(record_loss(draft, r, cfg, "cpu", noise=0.0, loss_rules=rules)[0]) for r in records]
    assert all(torch.isfinite(torch.tensor(losses)))
    log = json.loads((tmp_path / "d" / "training_log.json").read_text())
    assert log["config"]["rules_ce"] is True
    assert log["history"][-1]["train_loss"] < log["history"][0]["train_loss"]


def test_teacher_temperature_sharpens_the_cross_entropy_target(tiny_llava, tiny_data):
    """Below 1 the cross-entropy's target sharpens towards the target's top token: the loss changes,
    stays finite with the rules' masks, and converges as the temperature goes to 0 (hard labels)."""
    from flash.engine.logits_rules import LogitsRules
    from flash.training.trainer import record_loss

    torch.manual_seed(0)
    rec = load_records(tiny_data, tiny_llava.name)[0]
    shape = DraftConfig(tiny_llava.name, hidden_size=tiny_llava.hidden_size, vocab_size=tiny_llava.vocab_size,
                        num_heads=4, intermediate_size=64, k=2, num_latents=2)
    draft = FlashDraft(shape).bind(tiny_llava)
    rules = LogitsRules(repetition_penalty=1.3, no_repeat_ngram_size=2)

    def loss(temperature: float) -> float:
        cfg = TrainConfig(**{**SMALL.__dict__, "rules_ce": True, "teacher_temperature": temperature})
        with torch.no_grad():
            return float(record_loss(draft, rec, cfg, "cpu", noise=0.0, loss_rules=rules)[0])

    soft, sharp, sharper = loss(1.0), loss(1e-3), loss(1e-4)
    assert all(map(math.isfinite, (soft, sharp, sharper)))
    assert sharp != pytest.approx(soft, rel=1e-3) and sharp == pytest.approx(sharper, rel=1e-4)
    with pytest.raises(ValueError):
        TrainConfig(teacher_temperature=0.0)


def test_auto_mixed_precision_follows_the_hardware(monkeypatch):
    """"auto" is bf16 only where bfloat16 matmuls are native (emulated bf16 is slower than fp32)."""
    from flash.training.trainer import resolve_mixed_precision

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(False, False, "no"), (True, False, "bf16"), (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert resolve_mixed_precision("auto", cpu) == expected
    assert resolve_mixed_precision("no", cpu) == "no" and resolve_mixed_precision("bf16", cpu) == "bf16"
    assert resolve_mixed_precision("auto", torch.device("meta")) == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp16")


def test_bf16_autocast_keeps_the_target_side_in_fp32(tiny_llava, tiny_data, monkeypatch):
    """Under bf16 autocast the loss moves by bf16 rounding only, and the target's side (the
    cross-entropy's teacher logits, from the frozen head) is still computed in fp32."""
    from flash.engine.logits_rules import LogitsRules
    from flash.training.trainer import record_loss

    torch.manual_seed(0)
    rec = load_records(tiny_data, tiny_llava.name)[0]
    shape = DraftConfig(tiny_llava.name, hidden_size=tiny_llava.hidden_size, vocab_size=tiny_llava.vocab_size,
                        num_heads=4, intermediate_size=64, k=2, num_latents=2)
    draft = FlashDraft(shape).bind(tiny_llava)
    cfg = TrainConfig(**{**SMALL.__dict__, "rules_ce": True})
    rules = LogitsRules(repetition_penalty=1.3, no_repeat_ngram_size=2)
    with torch.no_grad():
        fp32 = float(record_loss(draft, rec, cfg, "cpu", noise=0.0, loss_rules=rules)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = float(record_loss(draft, rec, cfg, "cpu", noise=0.0, loss_rules=rules)[0])
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32

    seen = {}
    original = FlashDraft.draft_logits

    def spy(self, features):
        out = original(self, features)
        seen.setdefault("teacher", out.dtype)  # the first call is the target's side
        return out

    monkeypatch.setattr(FlashDraft, "draft_logits", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        record_loss(draft, rec, cfg, "cpu", noise=0.0, loss_rules=rules)
    assert seen["teacher"] == torch.float32


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_in_each_precision_learns_and_logs_it(tiny_llava, tiny_data, tmp_path, precision):
    records = load_records(tiny_data, tiny_llava.name)
    cfg = TrainConfig(**{**SMALL.__dict__, "epochs": 3, "lr": 3e-3, "mixed_precision": precision})
    draft = train(tiny_llava, records, tmp_path / "d", cfg, log=lambda m: None)
    assert all(p.dtype == torch.float32 for p in draft.parameters())  # autocast never lowers the weights
    log = json.loads((tmp_path / "d" / "training_log.json").read_text())
    assert log["mixed_precision"] == precision
    assert log["history"][-1]["train_loss"] < log["history"][0]["train_loss"]


def test_training_for_a_time_stops_when_it_is_up_with_the_rate_decayed(tiny_llava, tiny_data, tmp_path):
    """``minutes``: as many epochs as fit (``epochs`` is ignored), the cosine over the time, and the last
    step at the lowest rate; the log says how far the last epoch got."""
    import time

    records = load_records(tiny_data, tiny_llava.name)
    cfg = TrainConfig(**{**SMALL.__dict__, "minutes": 0.05, "lr": 3e-3})  # 3 s
    begin = time.perf_counter()
    train(tiny_llava, records, tmp_path / "d", cfg, log=lambda m: None)
    assert time.perf_counter() - begin >= 3.0
    log = json.loads((tmp_path / "d" / "training_log.json").read_text())
    history = log["history"]
    assert log["config"]["minutes"] == 0.05 and len(history) > cfg.epochs
    assert history[-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert history[0]["lr"] > history[-1]["lr"] and all(h["heldout"] for h in history)
    assert all("records" not in h for h in history[:-1])  # only the last epoch can stop part-way
    with pytest.raises(ValueError, match="minutes"):
        TrainConfig(minutes=-1)


def test_a_sharded_corpus_is_the_whole_one_split_between_processes():
    """``build_corpus(shard=(i, n))`` keeps what ``items[i::n]`` of the whole corpus would be (held-out
    items first, ``first_item`` applied), with the same media, so n processes still fill one cache."""
    from flash.training.corpus import build_corpus

    whole = build_corpus(7, 3, seed=0, first_item=2)
    assert [i.item_id for i in whole] == ["heldout-00000", "heldout-00001", "heldout-00002",
                                          *(f"train-{k:05d}" for k in range(2, 7))]
    parts = [build_corpus(7, 3, seed=0, first_item=2, shard=(i, 2)) for i in range(2)]
    for i, part in enumerate(parts):
        assert [item.item_id for item in part] == [item.item_id for item in whole[i::2]]
        for mine, theirs in zip(part, whole[i::2], strict=True):
            assert mine.prompt == theirs.prompt and mine.kind == theirs.kind
            assert [f.tobytes() for f in mine.media.frames] == [f.tobytes() for f in theirs.media.frames]


def test_class_labels_name_every_imagenet_class_once_per_thousand():
    """The labelled items' classes: each of the 1000 once in every 1000 items, about 60% confident (one
    class at p >= 0.5), the rest a guess between the class and a neighbour (both under 0.5, the class first)."""
    from flash.training.corpus import IMAGENET_CLASSES, class_labels

    labels = class_labels(2 * IMAGENET_CLASSES, seed=0)
    for block in (labels[:IMAGENET_CLASSES], labels[IMAGENET_CLASSES:]):
        assert sorted(label[0][0] for label in block) == list(range(IMAGENET_CLASSES))
    confident = [label for label in labels if len(label) == 1]
    assert 0.55 < len(confident) / len(labels) < 0.65
    assert all(0.5 <= p <= 0.95 for (_, p), in confident)
    for (cls, p), (near, q) in (label for label in labels if len(label) == 2):
        assert 0 < abs(near - cls) <= 4 and 0 <= near < IMAGENET_CLASSES and q <= p < 0.5
    assert class_labels(50, seed=0) == labels[:50] and class_labels(50, seed=1) != labels[:50]


def test_class_items_are_labelled_media_split_between_processes():
    from flash.training.corpus import class_items, class_labels

    whole = class_items(6, seed=0)
    assert [item.media.classes for item in whole] == class_labels(6, seed=0)
    assert all(item.split == "train" and item.item_id.startswith("class-") for item in whole)
    parts = [class_items(6, seed=0, shard=(i, 2)) for i in range(2)]
    for i, part in enumerate(parts):
        assert [item.item_id for item in part] == [item.item_id for item in whole[i::2]]
        for mine, theirs in zip(part, whole[i::2], strict=True):
            assert mine.media.classes == theirs.media.classes
            assert [f.tobytes() for f in mine.media.frames] == [f.tobytes() for f in theirs.media.frames]


def test_a_draft_vocabulary_grows_from_a_saved_one(tiny_llava, tiny_data, tmp_path):
    """--init-from a draft with a larger --draft-vocab: the saved tokens stay, the most frequent others
    are added, and on the saved tokens the grown draft scores exactly as the saved one did."""
    from flash.training.trainer import _continue_from

    records = load_records(tiny_data, tiny_llava.name)
    train(tiny_llava, records, tmp_path / "small", SMALL, log=lambda m: None)
    small = FlashDraft.load(tmp_path / "small").bind(tiny_llava)
    size = SMALL.draft_vocab_size + 16
    grown = FlashDraft(DraftConfig(**{**asdict(small.cfg), "draft_vocab_size": size}))
    train_recs = [r for r in records if r.split == "train"]
    _continue_from(grown, tmp_path / "small", train_recs, tiny_llava.eos_token_ids)
    grown = grown.eval().bind(tiny_llava)
    old, new = small.draft_to_target.tolist(), grown.draft_to_target.tolist()
    assert len(new) == size and set(old) < set(new) and new == sorted(new)
    frequent = Counter(t for r in train_recs for t in r.response.tolist())
    added = set(new) - set(old)
    assert min(frequent[t] for t in added) >= max((frequent[t] for t in frequent if t not in new), default=0)
    h = torch.randn(5, tiny_llava.hidden_size)
    with torch.no_grad():
        columns = torch.tensor([new.index(t) for t in old])
        torch.testing.assert_close(grown.draft_logits(h)[:, columns], small.draft_logits(h))
    # through train(): the grown draft is what it saves
    train(tiny_llava, records, tmp_path / "grown", TrainConfig(**{**SMALL.__dict__, "draft_vocab_size": size,
                                                                 "init_from": str(tmp_path / "small")}),
          log=lambda m: None)
    assert set(old) < set(FlashDraft.load(tmp_path / "grown").draft_to_target.tolist())
    with pytest.raises(DraftError, match="draft_vocab_size .* only num_layers and the draft vocabulary may grow"):
        _continue_from(FlashDraft(small.cfg), tmp_path / "grown")
