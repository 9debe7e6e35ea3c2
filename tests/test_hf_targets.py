"""The Hugging Face target adapters against the models' own ``generate`` (tiny random models)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from flash.hf_targets import (
    LlavaTarget,
    Qwen25VLTarget,
    TargetLoadError,
    load_hf_target,
    tiny_llava,
    tiny_qwen2_5_vl,
)
from flash.media import Media
from flash.target import Prompt, TargetModel

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
