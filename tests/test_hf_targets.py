"""The Hugging Face target adapters against the models' own ``generate`` (tiny random models); the
GPU path's correctness on CPU: tree verification on every attention implementation, a target split
over devices, the draft's shared LM head, and the one model cache."""

from __future__ import annotations

import copy
import gc
import importlib.util
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_tree_pass_equals_chains, echo_draft, random_draft
from PIL import Image
from torch.overrides import TorchFunctionMode

from flash import models
from flash.engine import METHODS, GenerationConfig, TreeConfig, collect, flash_method, generate
from flash.engine.logits_rules import LogitsRules
from flash.engine.tree import DraftTree, tree_attention
from flash.media import Media
from flash.targets.base import PrefillOutput, Prompt, TargetModel, TargetState
from flash.targets.hf import HFTarget
from flash.targets.hub import TargetLoadError, load_hf_target
from flash.targets.llava import LlavaTarget
from flash.targets.qwen2_5_vl import Qwen25VLTarget
from flash.targets.tiny import tiny_llava, tiny_qwen2_5_vl

N_NEW = 16
FACTORIES: dict[str, Callable[[int], TargetModel]] = {"llava": tiny_llava, "qwen": tiny_qwen2_5_vl}


@pytest.fixture(scope="module")
def targets() -> dict[str, TargetModel]:
    return {key: make(0) for key, make in FACTORIES.items()}


def _gradient(width: int, height: int, shift: int) -> Image.Image:
    """An RGB picture with structure (so the vision tower sees more than a flat colour)."""
    img = Image.new("RGB", (width, height))
    img.putdata(
        [
            ((x * 7 + shift) % 256, (y * 5 + 3 * shift) % 256, (x * y + shift) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return img


def _media(kind: str | None) -> Media | None:
    if kind == "image":
        return Media(kind="image", frames=(_gradient(80, 60, 0),), source="img.png", size=(80, 60))
    if kind == "video":
        # 5 frames: an odd count, so Qwen pads the last temporal group by repeating the last frame.
        frames = tuple(_gradient(84, 56, 40 * i) for i in range(5))
        return Media(kind="video", frames=frames, source="clip.mp4", size=(84, 56), duration_s=2.5)
    return None


def _prompt(target: TargetModel, kind: str | None) -> Prompt:
    media = _media(kind)
    return target.build_prompt(media, target.default_prompt(media))


def _greedy(target: TargetModel, prompt: Prompt, n: int) -> tuple[list[int], torch.Tensor]:
    """Prefill, then n - 1 single-token forwards, always taking the argmax: (tokens, logits [n, V])."""
    pre = target.prefill(prompt)
    tokens, steps = [int(pre.last_logits.argmax())], [pre.last_logits]
    for _ in range(n - 1):
        logits, _ = target.forward(pre.state, torch.tensor([[tokens[-1]]]))
        tokens.append(int(logits[-1].argmax()))
        steps.append(logits[-1])
    return tokens, torch.stack(steps)


def _generate(target: TargetModel, prompt: Prompt, n: int) -> tuple[list[int], torch.Tensor]:
    """The model's own greedy generate on the same inputs: (new tokens, their logits)."""
    with torch.inference_mode():
        out = target.model.generate(
            **target.model_inputs(prompt),
            do_sample=False,
            max_new_tokens=n,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = torch.stack([step[0] for step in out.logits]).float()
    return out.sequences[0, prompt.length :].tolist(), logits


@pytest.mark.parametrize("kind", ["image", "video", None])
@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_greedy_decoding_matches_generate(
    targets: dict[str, TargetModel], key: str, kind: str | None
) -> None:
    target = targets[key]
    prompt = _prompt(target, kind)
    ours, our_logits = _greedy(target, prompt, N_NEW)
    theirs, their_logits = _generate(target, prompt, N_NEW)
    # generate stops at EOS; everything up to there must agree token for token.
    assert ours[: len(theirs)] == theirs
    assert len(theirs) == N_NEW or theirs[-1] in target.eos_token_ids
    # Same computation, so the logits agree too (a wrong rotary position would show here first).
    torch.testing.assert_close(our_logits[: len(theirs)], their_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_crop_then_reforward_reproduces_logits(
    targets: dict[str, TargetModel], key: str, kind: str
) -> None:
    target = targets[key]
    prompt = _prompt(target, kind)
    pre = target.prefill(prompt)
    state = pre.state
    tokens = torch.tensor([[5, 17, 42, 99, 3, 60]])
    before = [target.forward(state, tokens[:, i : i + 1])[0] for i in range(tokens.shape[1])]
    assert state.length == prompt.length + 6
    target.crop(state, prompt.length + 2)  # reject the last four
    assert state.length == prompt.length + 2
    assert state.cache.get_seq_length() == prompt.length + 2
    # A different token at the rolled-back position, then the original ones again.
    target.forward(state, torch.tensor([[7]]))
    target.crop(state, prompt.length + 2)
    after = [target.forward(state, tokens[:, i : i + 1])[0] for i in range(2, tokens.shape[1])]
    for old, new in zip(before[2:], after, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    # Crop back to the prompt: the next token's logits are the prefill's again.
    target.crop(state, prompt.length)
    logits, _ = target.forward(state, tokens[:, :1])
    torch.testing.assert_close(logits[0], before[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_multi_token_forward_matches_single_steps(
    targets: dict[str, TargetModel], key: str, kind: str
) -> None:
    target = targets[key]
    prompt = _prompt(target, kind)
    state = target.prefill(prompt).state
    tokens = torch.tensor([[11, 23, 35, 47, 59, 71, 83]])
    block_logits, block_hidden = target.forward(state, tokens)
    assert block_logits.shape == (7, target.vocab_size) and block_logits.dtype == torch.float32
    assert block_hidden.shape == (7, target.hidden_size)
    assert state.length == prompt.length + 7
    target.crop(state, prompt.length)
    steps = [target.forward(state, tokens[:, i : i + 1]) for i in range(tokens.shape[1])]
    step_logits = torch.cat([logits for logits, _ in steps])
    step_hidden = torch.cat([hidden for _, hidden in steps])
    assert torch.equal(block_logits.argmax(-1), step_logits.argmax(-1))
    torch.testing.assert_close(block_logits, step_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block_hidden, step_hidden, rtol=1e-4, atol=1e-4)


def test_qwen_positions_ignore_the_models_stored_rope_deltas(targets: dict[str, TargetModel]) -> None:
    """Positions come from the state, not from ``model.model.rope_deltas`` (which generate mutates)."""
    target = targets["qwen"]
    prompt = _prompt(target, "video")
    expected, _ = _greedy(target, prompt, 8)
    assert target.prefill(prompt).state.rope_offset < 0  # the video compresses positions
    target.model.model.rope_deltas = torch.tensor([[1000]])
    try:
        assert _greedy(target, prompt, 8)[0] == expected
    finally:
        target.model.model.rope_deltas = None


def test_qwen_video_patches_use_the_image_processor_layout(targets: dict[str, TargetModel]) -> None:
    """A still 2-frame video is one temporal group whose patches equal the image's."""
    target = copy.copy(targets["qwen"])  # shares the model; only the pixel budget changes
    assert isinstance(target, Qwen25VLTarget)
    target.video_min_pixels = target.image_processor.size["shortest_edge"]
    target.video_max_pixels = target.image_processor.size["longest_edge"]
    frame = _gradient(100, 70, 9)
    video = target.video_pixels([frame, frame], duration_s=1.0)
    image = target.image_processor(images=[frame], return_tensors="pt")
    assert [list(video.grid_thw)] == image["image_grid_thw"].tolist()
    torch.testing.assert_close(video.pixel_values_videos, image["pixel_values"], rtol=0, atol=1e-5)
    assert video.second_per_grid_t == pytest.approx(1.0)  # 2 frames per group at 2 fps


def _placeholder_ids(target: TargetModel) -> set[int]:
    if isinstance(target, Qwen25VLTarget):
        return {target.image_token_id, target.video_token_id}
    assert isinstance(target, LlavaTarget)
    return {target.image_token_id}


@pytest.mark.parametrize(
    ("key", "kind", "n_spans"),
    [
        ("llava", "image", 1),
        ("llava", "video", 5),  # one span per frame
        ("qwen", "image", 1),
        ("qwen", "video", 3),  # one span per temporal group: ceil(5 frames / 2)
        ("llava", None, 0),
        ("qwen", None, 0),
    ],
)
def test_media_spans_cover_exactly_the_placeholders(
    targets: dict[str, TargetModel], key: str, kind: str | None, n_spans: int
) -> None:
    target = targets[key]
    prompt = _prompt(target, kind)
    ids = prompt.input_ids[0].tolist()
    placeholders = {i for i, tok in enumerate(ids) if tok in _placeholder_ids(target)}
    covered = [i for start, end in prompt.media_spans for i in range(start, end)]
    assert len(prompt.media_spans) == n_spans
    assert len(covered) == len(set(covered)) and set(covered) == placeholders
    assert all(start < end for start, end in prompt.media_spans)
    assert list(prompt.media_spans) == sorted(prompt.media_spans)
    sizes = {end - start for start, end in prompt.media_spans}
    assert len(sizes) <= 1  # every frame / temporal group gets the same number of tokens


@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_prefill_outputs_and_heads(targets: dict[str, TargetModel], key: str) -> None:
    target = targets[key]
    prompt = _prompt(target, "image")
    pre = target.prefill(prompt)
    assert pre.hidden.shape == (prompt.length, target.hidden_size)
    assert pre.last_logits.shape == (target.vocab_size,) and pre.last_logits.dtype == torch.float32
    torch.testing.assert_close(target.lm_head(pre.hidden[-1]).float(), pre.last_logits)
    with torch.inference_mode():
        full = target.model(**target.model_inputs(prompt)).logits[0, -1]
    torch.testing.assert_close(pre.last_logits, full.float(), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(target.embed(ids), target.model.get_input_embeddings().weight[ids])
    assert target.eos_token_ids and all(0 <= i < target.vocab_size for i in target.eos_token_ids)
    assert isinstance(target.decode([10, 11, 12]), str)
    # The pixels matter: another picture changes the prediction.
    other = Media(kind="image", frames=(_gradient(80, 60, 123),), source="b.png", size=(80, 60))
    other_logits = target.prefill(target.build_prompt(other, target.default_prompt(other))).last_logits
    assert not torch.allclose(other_logits, pre.last_logits)


@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_tiny_models_are_deterministic(targets: dict[str, TargetModel], key: str) -> None:
    again = FACTORIES[key](0)
    assert again.name == targets[key].name
    mine, theirs = again.model.state_dict(), targets[key].model.state_dict()
    assert mine.keys() == theirs.keys()
    for name, weight in mine.items():
        assert torch.equal(weight, theirs[name]), name
    assert FACTORIES[key](1).name != again.name


@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_load_hf_target_from_a_local_directory(
    targets: dict[str, TargetModel], key: str, tmp_path: Path
) -> None:
    target = targets[key]
    target.save_pretrained(tmp_path)
    loaded = load_hf_target(str(tmp_path))
    assert type(loaded) is type(target) and loaded.name == str(tmp_path)
    for kind in ("image", "video"):
        mine, theirs = _prompt(target, kind), _prompt(loaded, kind)
        assert torch.equal(mine.input_ids, theirs.input_ids) and mine.media_spans == theirs.media_spans
        torch.testing.assert_close(loaded.prefill(theirs).last_logits, target.prefill(mine).last_logits)


def test_load_hf_target_missing_model_is_one_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(TargetLoadError, match="not available offline"):
        load_hf_target(missing)


# --- tree verification on every attention implementation ------------------------------------------

ATTENTION = ("sdpa", "eager")


@pytest.fixture(scope="module")
def by_attention() -> dict[tuple[str, str], TargetModel]:
    """The tiny targets (same weights) with each attention implementation that verifies trees."""
    return {(key, attn): make(0, attn) for key, make in FACTORIES.items() for attn in ATTENTION}


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_a_tree_pass_equals_one_chain_per_branch(by_attention, key, attn) -> None:
    """Every row of a tree pass sees exactly its own path: its logits are its branch's as a chain."""
    target = by_attention[key, attn]
    assert target.attn_implementation == attn and target.supports_tree
    assert_tree_pass_equals_chains(target, _prompt(target, "image"))


def _tree_config(**kwargs) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=N_NEW, tree=TreeConfig(nodes=6, branch=3, min_prob=0.0), **kwargs)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_greedy_methods_equal_ar_on_every_attention(by_attention, key, attn) -> None:
    """Greedy flash / flash-tree / eagle = ar token for token, chain and tree, with a draft that is
    often right (the echo draft) and one that is rarely right (random)."""
    target = by_attention[key, attn]
    config = _tree_config(rules=target.logits_rules())
    for kind in ("image", "video"):
        prompt = _prompt(target, kind)
        expected = collect(generate(target, prompt, "ar", None, config)).tokens
        for label, draft in (("echo", echo_draft(target)), ("random", random_draft(target, seed=3))):
            for method in ("flash", "flash-tree", "eagle"):
                got = collect(generate(target, prompt, method, draft, config)).tokens
                assert got == expected, f"{key} {attn} {kind} {method} ({label} draft)"


@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_sampling_draws_the_same_tokens_on_eager_as_on_sdpa(by_attention, key) -> None:
    """Seeded sampling: eager attention gives the draws sdpa gives, seed for seed, for every method (the
    sdpa law is tested in test_decoding.py). Fixed seeds: the comparison is deterministic."""
    sdpa, eager = by_attention[key, "sdpa"], by_attention[key, "eager"]
    prompt = _prompt(sdpa, "image")
    for method in ("ar", "flash", "flash-tree", "eagle"):
        for seed in range(6):
            config = _tree_config(temperature=1.0, seed=seed, rules=sdpa.logits_rules())
            runs = [collect(generate(t, prompt, method, None if method == "ar" else echo_draft(t), config))
                    for t in (sdpa, eager)]
            assert runs[1].tokens == runs[0].tokens, f"{key} {method} seed {seed}"
            if method != "ar":
                assert runs[0].proposed > 0


def test_a_boolean_tree_mask_on_eager_attention_would_be_caught(by_attention, monkeypatch) -> None:
    """The bug the additive mask fixes: eager attention adds a 4D mask to its scores, so a boolean one
    adds 1 / 0 and masks nothing. The greedy check above catches it (so it can fail)."""
    monkeypatch.setattr(HFTarget, "_tree_mask", lambda self, mask: mask.to(self.device)[None, None])
    target = by_attention["llava", "eager"]
    prompt = _prompt(target, "image")
    config = _tree_config()
    expected = collect(generate(target, prompt, "ar", None, config)).tokens
    got = collect(generate(target, prompt, "flash-tree", echo_draft(target), config)).tokens
    assert got != expected


def test_flash_attention_targets_verify_chains_and_refuse_trees(photos) -> None:
    """flash-attention takes no 4D mask: such a target says so, races the chain, and a tree is refused
    in one line (the attention is only named here: flash-attn does not run on CPU)."""
    target = tiny_llava(0)
    target.model.config.get_text_config()._attn_implementation = "flash_attention_2"
    assert not target.supports_tree and flash_method(target) == "flash"
    prompt = _prompt(target, "image")
    with pytest.raises(ValueError, match="cannot verify draft trees; use 'flash'"):
        generate(target, prompt, "flash-tree", random_draft(target), GenerationConfig())
    tree = DraftTree(tokens=(5,), parents=(-1,), depths=(1,))
    mask, positions = tree_attention(tree, 3)
    with pytest.raises(ValueError, match=r"flash_attention_2 attention, which takes no tree mask") as err:
        target.forward_tree(TargetState(cache=None, length=3), torch.tensor([[1, 5]]), mask, positions)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_loading_with_flash_attention_unavailable_is_one_clear_error(targets, tmp_path) -> None:
    targets["llava"].save_pretrained(tmp_path)
    with pytest.raises(TargetLoadError, match="cannot load") as err:
        load_hf_target(str(tmp_path), attn_implementation="flash_attention_2")
    assert "\n" not in str(err.value)


# --- a target split over devices (device_map="auto") ------------------------------------------------

LAST = torch.device("cuda", 1)  # a name only: nothing runs on CUDA
_DEVICE_OF = torch.Tensor.device.__get__  # compared with ==: each lookup makes a new method-wrapper


class OnLast(torch.Tensor):
    """A CPU tensor that stands for one on a split target's last device (see :class:`TwoDevices`)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def _plain(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, OnLast) else x


def on_last(x):
    """``x`` marked as living on the last device."""
    return x.as_subclass(OnLast) if isinstance(x, torch.Tensor) and not isinstance(x, OnLast) else x


def _device(value) -> torch.device | None:
    """``value`` as a device, if it names one."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda", "meta"):
        return torch.device(value)
    return None


def _leaves(value) -> list:
    if type(value) in (list, tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    if type(value) is dict:
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


def _unmark(value):
    if type(value) in (list, tuple):
        return type(value)(_unmark(v) for v in value)
    if type(value) is dict:
        return {k: _unmark(v) for k, v in value.items()}
    return torch.device("cpu") if _device(value) == LAST else _plain(value)


def _mark(value):
    if type(value) in (list, tuple):
        return type(value)(_mark(v) for v in value)
    return on_last(value)


class TwoDevices(TorchFunctionMode):
    """Two devices on a CPU-only machine: while active, :class:`OnLast` tensors are on ``LAST`` (a split
    target's last GPU) and plain ones on the input device (its first GPU, where the draft sits).

    An op that mixes the two raises, as on CUDA (0-dim tensors, and host indices into a tensor on the
    last device, excepted, as CUDA allows them); ``.to(device)``, ``.cpu()`` and factories given a
    ``device`` move between the two; ``.device`` says ``LAST`` for a marked tensor. So a loop runs
    here exactly when every tensor it combines was moved to one device first.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_OF:
            return LAST if isinstance(args[0], OnLast) else func(*args)
        if func is torch.Tensor.to:
            return self._to(args, kwargs)
        if func is torch.Tensor.cpu:
            return func(_plain(args[0]), *args[1:], **kwargs)
        tensors = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        marked = any(isinstance(t, OnLast) for t in tensors)
        if marked:
            host_index = args[1] if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) \
                and isinstance(args[0], OnLast) else None
            stray = [t for t in tensors if not isinstance(t, OnLast) and t.dim() > 0 and t is not host_index]
            if stray:
                raise RuntimeError(f"{getattr(func, '__name__', func)}: tensors on two devices "
                                   f"({LAST} and {stray[0].device}, shape {tuple(stray[0].shape)})")
        out = func(*_unmark(args), **_unmark(kwargs))
        return _mark(out) if marked or _device(kwargs.get("device")) == LAST else out

    @staticmethod
    def _to(args, kwargs):
        x, rest = args[0], args[1:]
        dest = None
        for value in (kwargs.get("device"), *rest):
            if _device(value) is not None:
                dest = _device(value)
                break
            if isinstance(value, torch.Tensor):  # x.to(other): other's device and dtype
                dest = LAST if isinstance(value, OnLast) else value.device
                break
        out = _plain(x).to(*_unmark(rest), **_unmark(kwargs))
        return on_last(out) if (dest == LAST if dest is not None else isinstance(x, OnLast)) else out


def split_outputs(target: TargetModel) -> TargetModel:
    """A shallow copy of ``target`` whose logits, ``h`` and LM head come back on ``LAST`` while its
    inputs and embeddings stay on its input device: what accelerate's device_map gives over GPUs."""
    clone = copy.copy(target)

    def on_last_outputs(method):
        def run(*args, **kwargs):
            with torch._C.DisableTorchFunction():  # the model's own ops: all on one device, unchecked (fast)
                logits, hidden = method(*args, **kwargs)
            return on_last(logits), on_last(hidden)

        return run

    def prefill(prompt: Prompt) -> PrefillOutput:
        with torch._C.DisableTorchFunction():
            pre = target.prefill(prompt)
        return PrefillOutput(pre.state, on_last(pre.last_logits), on_last(pre.hidden))

    clone.prefill = prefill
    clone.forward = on_last_outputs(target.forward)
    clone.forward_tree = on_last_outputs(target.forward_tree)
    clone.lm_head = lambda hidden: on_last(target.lm_head(_plain(hidden)))
    clone.lm_head_weight = lambda: on_last(target.lm_head_weight())
    return clone


def test_two_devices_refuses_mixing_and_follows_moves() -> None:
    with TwoDevices():
        last = on_last(torch.ones(3))
        with pytest.raises(RuntimeError, match="two devices"):
            torch.cat([last, torch.ones(3)])
        with pytest.raises(RuntimeError, match="two devices"):
            _ = torch.ones(3)[torch.tensor([0, 1]).to(last.device)]  # an index on the wrong device
        assert last.device == LAST and (last + torch.tensor(1.0)).device == LAST  # a 0-dim host scalar
        assert torch.zeros(2, device=last.device).device == LAST
        moved = (last.to(torch.device("cpu")) + torch.ones(3)).to(last)
        assert moved.device == LAST and torch.equal(_plain(moved), torch.full((3,), 2.0))
        assert last[torch.tensor([0, 2])].device == LAST  # a host index


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("key", ["llava", "qwen"])
def test_every_method_runs_on_a_target_split_over_devices(targets, key, temperature) -> None:
    """Logits and h come back on the target's last device, the draft sits on its first (the embeddings'):
    each loop moves what it combines (h to the draft, the drafts to the logits), the draft computes its
    logits on the shared head's device, and every method gives the tokens it gives unsplit. The reduced
    vocabulary runs with repetition rules, whose state follows the logits."""
    target = targets[key]
    prompt = _prompt(target, "image")
    split = split_outputs(target)
    penalties = LogitsRules(repetition_penalty=1.5, no_repeat_ngram_size=2)
    for vocab, rules in ((None, target.logits_rules()), (torch.arange(0, target.vocab_size, 2), penalties)):
        config = GenerationConfig(max_new_tokens=N_NEW, temperature=temperature, seed=1, rules=rules)
        for method in METHODS:
            needs_draft = method not in ("ar", "pld")
            draft = random_draft(target, seed=3, draft_vocab=vocab) if needs_draft else None
            expected = collect(generate(target, prompt, method, draft, config)).tokens
            with TwoDevices():
                draft = random_draft(split, seed=3, draft_vocab=vocab) if needs_draft else None
                if draft is not None:
                    assert (draft._head_weight.device == LAST) == (vocab is None)  # shared there, or a slice here
                got = collect(generate(split, prompt, method, draft, config)).tokens
            assert got == expected, f"{key} {method} T={temperature} vocab {'full' if vocab is None else 'reduced'}"


def test_the_adapter_reports_where_its_outputs_come_back(targets) -> None:
    target = targets["llava"]
    assert target.output_device == target.device == torch.device("cpu")
    logits, hidden = target.forward(target.prefill(_prompt(target, "image")).state, torch.tensor([[5]]))
    assert logits.device == hidden.device == target.output_device


# --- the draft's LM head: shared, not copied ---------------------------------------------------------


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the memory a tensor views."""
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def test_a_full_vocabulary_draft_shares_the_targets_head(targets) -> None:
    """No second [V, D] matrix (the old binding copied vocab x hidden x 4 bytes): the draft's head is
    the target's LM head weight itself."""
    target = targets["llava"]
    head = target.model.lm_head.weight
    draft = random_draft(target)
    assert _storage(draft._head_weight) == _storage(head)
    features = torch.randn(3, target.hidden_size)
    torch.testing.assert_close(draft.draft_logits(features), features @ head.detach().T)


def test_a_reduced_vocabulary_draft_copies_only_its_rows(targets) -> None:
    target = targets["llava"]
    vocab = torch.arange(0, target.vocab_size, 4)
    draft = random_draft(target, draft_vocab=vocab)
    rows = draft._head_weight
    assert _storage(rows)[1] == len(vocab) * target.hidden_size * rows.element_size()  # a quarter of the head
    torch.testing.assert_close(rows, target.model.lm_head.weight.detach()[vocab])


def test_packing_the_draft_keeps_no_fp32_head(targets) -> None:
    """pack_fp16 (CPU inference) keeps only the fp16 packed head: the fp32 rows are freed."""
    from flash.cpu.fp16_linear import fp16_gemm_available

    if not fp16_gemm_available():
        pytest.skip("no fp16 GEMM in this torch build")
    target = targets["llava"]
    vocab = torch.arange(0, target.vocab_size, 2)
    draft = random_draft(target, draft_vocab=vocab)
    features = torch.randn(2, target.hidden_size)
    expected = draft.draft_logits(features)
    fp32_rows = weakref.ref(draft._head_weight)
    draft.pack_fp16()
    gc.collect()
    assert draft._head_weight is None and fp32_rows() is None  # nothing holds the fp32 copy: freed
    packed = draft._head_fp16._packed
    if isinstance(packed, torch.Tensor):  # FLASH's kernel: fp16, padded to whole blocks of 16 rows
        assert _storage(packed)[1] == -(-len(vocab) // 16) * 16 * target.hidden_size * 2
    torch.testing.assert_close(draft.draft_logits(features), expected, atol=0.05, rtol=0.01)
    draft.bind(target)  # binding again repacks, again without keeping an fp32 copy
    assert draft._head_weight is None and draft._head_fp16 is not None


# --- one model cache, evicting on a model change ------------------------------------------------------


@pytest.fixture
def fresh_cache(monkeypatch):
    """flash.models' cache, emptied for one test (and put back after it)."""
    monkeypatch.setattr(models, "_TARGETS", {})
    monkeypatch.setattr(models, "_DRAFTS", {})
    return models


def test_loading_another_hub_model_evicts_the_previous_one(fresh_cache, targets, tmp_path) -> None:
    paths = {}
    for key in ("llava", "qwen"):
        paths[key] = str(tmp_path / key)
        targets[key].save_pretrained(paths[key])
    first = fresh_cache.load_target(paths["llava"])
    draft = fresh_cache.load_draft(first, quiet=True)
    assert fresh_cache.load_target(paths["llava"]) is first and fresh_cache.load_draft(first) is draft  # cached
    gone, gone_draft = weakref.ref(first), weakref.ref(draft)
    del first, draft
    second = fresh_cache.load_target(paths["qwen"])
    assert fresh_cache.loaded_targets() == (paths["qwen"],)
    gc.collect()
    assert gone() is None and gone_draft() is None  # nothing keeps the previous model alive: it is freed
    assert fresh_cache.load_draft(second, quiet=True) is fresh_cache.load_draft(second, quiet=True)
    fresh_cache.evict()
    assert fresh_cache.loaded_targets() == () and not fresh_cache._DRAFTS


def test_the_embedded_targets_stay_across_hub_models(fresh_cache, smollm2_target, targets, tmp_path) -> None:
    fresh_cache._TARGETS["smollm2"] = smollm2_target  # as if loaded earlier (saves its load)
    targets["llava"].save_pretrained(tmp_path)
    fresh_cache.load_target(str(tmp_path))
    assert fresh_cache.loaded_targets() == ("smollm2", str(tmp_path))
    assert fresh_cache.load_target("smollm2") is smollm2_target


def test_a_model_change_drops_the_drafts_of_targets_not_cached(fresh_cache, targets, tmp_path) -> None:
    """A caller's own targets (not from load_target) keep their drafts cached until a model change, which
    drops them with the evicted model's: a cached draft would keep its target in memory."""
    llava, qwen = targets["llava"], targets["qwen"]
    first = fresh_cache.load_draft(llava, quiet=True)
    fresh_cache.load_draft(qwen, quiet=True)
    assert fresh_cache.load_draft(llava) is first
    qwen.save_pretrained(tmp_path)
    loaded = fresh_cache.load_target(str(tmp_path))
    assert [target for target, _ in fresh_cache._DRAFTS.values()] == []
    assert fresh_cache.load_draft(loaded, quiet=True) is fresh_cache.load_draft(loaded)


# --- which draft setting each method reads ----------------------------------------------------------


def test_each_confidence_cut_acts_where_its_setting_says(targets) -> None:
    """``min_draft_prob`` cuts chains (flash, eagle) and the drawn tree's depth; greedy flash-tree cuts its
    nodes at ``tree.min_prob`` (the same joint probability, tuned apart) and does not read the former,
    nor does the drawn tree read the latter (GenerationConfig's comments, the CLI's help)."""
    target = targets["llava"]
    prompt = _prompt(target, "image")
    draft = echo_draft(target)
    base = GenerationConfig(max_new_tokens=N_NEW, tree=TreeConfig(min_prob=0.0))

    def steps(method: str, **changes) -> list[tuple[tuple[int, ...], int]]:
        config = replace(base, **changes)
        return [(event.tokens, event.proposed) for event in generate(target, prompt, method, draft, config)]

    def proposed(method: str, **changes) -> int:
        return sum(n for _, n in steps(method, **changes))

    assert steps("flash-tree", min_draft_prob=0.01) == steps("flash-tree")
    assert proposed("flash-tree", tree=TreeConfig(min_prob=0.01)) < proposed("flash-tree")
    assert proposed("flash", min_draft_prob=0.01) < proposed("flash")
    assert steps("flash", tree=TreeConfig(min_prob=0.01)) == steps("flash")
    sampled = {"temperature": 1.0, "seed": 0}
    assert proposed("flash-tree", min_draft_prob=0.01, **sampled) != proposed("flash-tree", **sampled)
    assert steps("flash-tree", tree=TreeConfig(min_prob=0.01), **sampled) == steps("flash-tree", **sampled)
