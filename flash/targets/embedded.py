"""The embedded CPU targets: a small instruct LM (SmolLM2-135M or Qwen2.5-Coder-0.5B) reading
MobileNetV2's view of the picture.

No image-text training data exists here, so the connector is training-free grounding:
- MobileNetV2's ImageNet classifier is applied at each of the 7x7 feature locations, and each of
  the 49 visual tokens per frame is the LM's embedding of that location's likely class names
  (a probability-weighted mix of the top classes). Many, redundant visual tokens, like a real LMM:
  this is what FLASH's visual compression works on. (Qwen's video frames pool them to 3x3, as
  video LMMs pool frames: :attr:`EmbeddedLM.video_grid`.)
- The confident *global* classes are also written into the prompt as text ("The picture shows:
  espresso."), because a 135M LM reads the class-name tokens poorly on their own.
It is a small demonstration LMM, not a real captioner: it can only name what ImageNet knows.
Each language model is described by an :class:`EmbeddedLM` (weights, name, prompt wording, rules).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from flash.cpu import cpu_kernels
from flash.cpu.fp16_linear import Fp16Linear, convert_linears, fp16_gemm_available
from flash.cpu.lean_llama import LeanLlama, fp32_linear
from flash.engine.logits_rules import LogitsRules
from flash.engine.sampling import choose_token  # the same token choice as the decoding loops
from flash.engine.verification import make_generator
from flash.targets.base import PrefillOutput, Prompt, TargetModel, TargetState
from flash.targets.faces import FaceDetector, load_face_detector, people_phrase
from flash.targets.imagenet_groups import everyday_group
from flash.targets.kv_cache import in_place_cache
from flash.targets.vision import FEATURE_GRID, load_mobilenet_v2, preprocess
from flash.weights import EMBEDDED_LM_WEIGHTS, MOBILENET_V2, MTCNN, cache_dir, fetch_any, fetch_weight

ASSETS = Path(__file__).resolve().parents[2] / "assets"
#: Bump when the connector or prompt format changes: drafts are tied to this name.
SMOLLM2_TARGET_NAME = "flash-default-v2:smollm2-135m-instruct+mobilenet_v2"
# v2: a video frame's visual tokens are pooled to a 3x3 grid (photos keep 7x7; v1 had 7x7 for both).
QWEN_TARGET_NAME = "flash-default-qwen-v2:qwen2.5-coder-0.5b-instruct+mobilenet_v2"
TOKENS_PER_FRAME = FEATURE_GRID * FEATURE_GRID
_MEDIA_MARK = "<|media|>"


@dataclass(frozen=True)
class EmbeddedLM:
    """One language model the embedded LMM runs on: its weights, the name drafts are tied to, its
    chat wording and the generation rules it decodes with by default."""

    key: str  # "smollm2" / "qwen2.5": a key of flash.weights.EMBEDDED_LM_WEIGHTS
    target_name: str
    converted_dir: str  # under cache_dir(): the GGUF converted once to safetensors
    system: str
    photo_request: str  # the default request when the user gives none
    video_request: str
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    hedge: bool = False  # ground with the classifier's confidence ("It may show a ... or a ...")
    # Visual tokens are multiplied by this. Qwen copies full-strength class-name tokens in loops
    # ("espresso espresso ..." on coffee.jpg, also when only their spatial contrast is kept); at 0.03
    # they sit below the first RMSNorm's epsilon's reach (~0.5x after it) and the loops stop, while
    # each image's tokens still differ (what the draft's latent compression reads).
    visual_scale: float = 1.0
    # A video frame's visual tokens are average-pooled from MobileNetV2's 7x7 grid to this one (as
    # LLaVA-OneVision pools video frames harder than images). Qwen's 8-frame clip at 7x7 is 392 visual
    # positions, its prefill ~2.0 s, a third of `ar`'s whole caption; at 3x3 it is 72 and ~0.55 s, and
    # the captions, which follow the grounding text, hardly change (docs/qwen_model.md).
    video_grid: int = FEATURE_GRID


SMOLLM2_LM = EmbeddedLM(
    key="smollm2", target_name=SMOLLM2_TARGET_NAME, converted_dir="smollm2-135m-instruct",
    system="You are a helpful assistant who describes photos in vivid detail.",
    photo_request="Describe this image in detail.", video_request="Describe what happens in this video.",
    # Without these the 135M LM loops ("bubble bubble ..."), which would also flatter FLASH.
    repetition_penalty=1.2, no_repeat_ngram_size=3)
QWEN_LM = EmbeddedLM(
    key="qwen2.5", target_name=QWEN_TARGET_NAME, converted_dir="qwen2.5-coder-0.5b-instruct",
    system="You are a helpful assistant.",
    # "Describe this photo in three or four sentences: ..." got 13-69 tokens on held-out media, so the
    # prefill dominated; asking for a paragraph got 68-118 (docs/qwen_model.md).
    photo_request="Write one paragraph of four sentences about this photo: what it shows, its colours, "
                  "its setting and its mood.",
    video_request="Write one paragraph of four sentences about this video: what it shows, what happens, "
                  "its setting and its mood.",
    # Only whole-sentence loops are banned (lion.jpg repeated one sentence three times): an 8-gram
    # repeats almost never otherwise, so the rule leaves the distribution FLASH drafts alone.
    no_repeat_ngram_size=8, hedge=True, visual_scale=0.03, video_grid=3)
EMBEDDED_LMS = {lm.key: lm for lm in (SMOLLM2_LM, QWEN_LM)}


@dataclass(frozen=True)
class ConnectorConfig:
    """How classifier outputs become visual tokens and prompt text."""

    top_classes_per_token: int = 3
    global_min_prob: float = 0.12
    global_max_classes: int = 3


def _load_language_model(spec: EmbeddedLM, quiet: bool) -> tuple[torch.nn.Module, object]:
    """Load ``spec``'s LM from its converted safetensors cache, converting from GGUF on first use."""
    converted = cache_dir() / spec.converted_dir
    if not (converted / "config.json").exists():
        gguf = fetch_any(EMBEDDED_LM_WEIGHTS[spec.key], quiet=quiet)
        if not quiet:
            print(f"Converting {spec.converted_dir} from GGUF to safetensors (once, 15-90 s)...", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The loaded model still carries the GGUF quantizer; saving needs it gone (weights are dense).
        del lm.config.quantization_config
        lm.hf_quantizer = None
        tmp = converted.with_name(converted.name + ".part")
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if converted.exists():
            import shutil

            shutil.rmtree(converted)
        tmp.rename(converted)
    lm = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(converted)
    return lm, tok


@dataclass(frozen=True)
class _PromptHead:
    """A prompt opening shared by every request, run through the LM once (see ``EmbeddedTarget.prefill``)."""

    ids: list[int]
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [1, kv_heads, P, head_dim] each
    hidden: torch.Tensor  # [P, D]


class EmbeddedTarget(TargetModel):
    """An embedded LM (Qwen2.5-Coder-0.5B-Instruct, the default model, or SmolLM2-135M-Instruct; see
    :class:`EmbeddedLM`) + MobileNetV2 grounding connector, on CPU.

    Activations are float32. With ``fp16_weights`` (the default where the kernel exists) the LM's
    linear layers and head hold their weights in fp16 (see :mod:`flash.cpu.fp16_linear`): the GGUF's
    Q4_1 values rounded to fp16, logits within ~0.05 of the fp32 model's. Every decoding method
    runs the same weights, so this is the model; ``weight_format`` says which one is in use.

    With ``lean`` (the default) the LM runs through :class:`flash.cpu.lean_llama.LeanLlama` (fused
    projections, one loop, in-place KV cache, grouped-KV SDPA: the same numbers, less overhead);
    otherwise through transformers' own modules, cache and ``sdpa`` (for comparisons). With
    ``cpu_ops`` (the default) and fp16 weights, the lean forward also runs FLASH's C++ norms, rotary
    embedding and decoding attention (:mod:`flash.cpu.lean_llama`; within float rounding of torch's).
    With ``prefix_cache`` (the default) a prefill reuses the keys/values of the chat template's constant
    opening (the system turn), computed once per target, and runs only the rest of the prompt.
    With a ``faces`` detector (the Qwen target's; :mod:`flash.targets.faces`) the hedged grounding also
    says when the picture shows people, which ImageNet's classes cannot.
    """

    def __init__(self, lm: torch.nn.Module, tokenizer, vision: torch.nn.Module, labels: list[str],
                 connector: ConnectorConfig = ConnectorConfig(), fp16_weights: bool = True,
                 lean: bool = True, cpu_ops: bool = True, spec: EmbeddedLM = SMOLLM2_LM,
                 prefix_cache: bool = True, faces: FaceDetector | None = None) -> None:
        self.lm, self.tokenizer, self.vision, self.labels = lm, tokenizer, vision, labels
        self.faces = faces
        self.connector, self.spec = connector, spec
        self.weight_format = "fp16" if fp16_weights and fp16_gemm_available() else "fp32"
        self._head: torch.nn.Module = lm.lm_head  # SmolLM2's is tied to the embeddings, which stay fp32
        if self.weight_format == "fp16":
            self._head = Fp16Linear(lm.lm_head)
        self._lean: LeanLlama | None = None
        if lean:
            fp16 = self.weight_format == "fp16"
            # FLASH's C++ norms, rotary embedding and decoding attention come with its fp16 kernel's
            # library (whichever GEMM runs).
            self._lean = LeanLlama(lm.model, Fp16Linear.from_weight if fp16 else fp32_linear,
                                   fused_ops=cpu_ops and fp16 and cpu_kernels.kernel_available())
            # The fused copies above now hold the layers' weights: drop transformers' layers, and make
            # running them an error rather than a silent no-op.
            lm.model.layers = torch.nn.ModuleList()
            lm.model.forward = _runs_through_lean_llama
        elif self.weight_format == "fp16":
            convert_linears(lm.model.layers)
        self.name = spec.target_name
        self.hidden_size = lm.config.hidden_size
        self.vocab_size = lm.config.vocab_size
        self.eos_token_ids = frozenset({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id})
        # Media positions hold <|endoftext|>'s id; their embeddings are replaced by visual tokens.
        self.placeholder_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self._label_embeds = self._embed_labels(labels)  # [1000, D]
        self.prefix_cache = prefix_cache
        self._head_cache: _PromptHead | None = None  # see _prompt_head

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @torch.inference_mode()
    def _embed_labels(self, labels: list[str]) -> torch.Tensor:
        table = self.lm.get_input_embeddings().weight
        rows = [table[self.tokenizer(" " + name, add_special_tokens=False).input_ids].mean(0) for name in labels]
        return torch.stack(rows)

    def logits_rules(self) -> LogitsRules:
        return LogitsRules(repetition_penalty=self.spec.repetition_penalty,
                           no_repeat_ngram_size=self.spec.no_repeat_ngram_size)

    def default_prompt(self, media) -> str:
        if media is not None and getattr(media, "kind", "image") == "video":
            return self.spec.video_request
        return self.spec.photo_request

    # --- prompt -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _see(self, frames) -> tuple[torch.Tensor, list[tuple[str, float]], list[str]]:
        """Visual tokens [F, T, D] (T = 49, or a video's pooled grid: :attr:`EmbeddedLM.video_grid`), the top
        global classes with their probabilities (averaged over a video's frames; the confident ones, or the
        single best), and each frame's top class."""
        local, global_ = self.vision(preprocess(frames))
        probs = local.softmax(-1)  # [F, 49, 1000]
        top_p, top_i = probs.topk(self.connector.top_classes_per_token, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True)
        tokens = (weights.unsqueeze(-1) * self._label_embeds[top_i]).sum(-2)  # [F, 49, D]
        grid = self.spec.video_grid if len(frames) > 1 else FEATURE_GRID
        if grid != FEATURE_GRID:
            f, _, d = tokens.shape
            square = tokens.reshape(f, FEATURE_GRID, FEATURE_GRID, d).permute(0, 3, 1, 2)
            tokens = torch.nn.functional.adaptive_avg_pool2d(square, grid).flatten(2).transpose(1, 2)
        frame_probs = global_.softmax(-1)  # [F, 1000]
        overall = frame_probs.mean(0)  # averaged over frames for a video
        p, idx = overall.topk(self.connector.global_max_classes)
        top = [(self._class_name(i), pi) for pi, i in zip(p.tolist(), idx.tolist(), strict=True)]
        confident = [(name, pi) for name, pi in top if pi >= self.connector.global_min_prob]
        per_frame = [self._class_name(i) for i in frame_probs.argmax(-1).tolist()]
        return tokens * self.spec.visual_scale, confident or top[:1], per_frame

    def _class_name(self, index: int) -> str:
        """ImageNet's name for class ``index``; with hedged grounding, followed by its everyday group
        where it has one ("Egyptian Mau (a cat)"): Qwen does not know most breed names."""
        name = self.labels[index]
        group = everyday_group(index) if self.spec.hedge else None
        return f"{name} ({_article(group)})" if group and group not in name.lower() else name

    def _chat_text(self, media, top: list[tuple[str, float]], frame_names: list[str], text: str) -> str:
        names = [name for name, _ in top]
        if media is None:
            user = text
        elif self.spec.hedge:
            # Qwen reads the grounding as a hint it may doubt: a confident class is stated, an unsure
            # one offered as a guess, so a wrong class is not asserted as fact.
            marks = "".join(f"{_MEDIA_MARK}\n" for _ in frame_names) if media.kind == "video" else f"{_MEDIA_MARK}\n"
            scenes = list(dict.fromkeys(frame_names))
            grounding = hedged_grounding(top, scenes if len(scenes) > 1 else None, self._people(media))
            user = f"{marks}{text} {grounding}"
        elif media.kind == "video":
            # Measured on the shipped and held-out clips: naming each frame's class next to its visual
            # tokens, and the scenes in order after the request ("espresso, then drilling rig"), keeps
            # the 135M LM on subject; bare frames or one overall list made it echo or drift.
            frames = "".join(f"Frame {i + 1} ({name}): {_MEDIA_MARK}\n" for i, name in enumerate(frame_names))
            scenes = ", then ".join(dict.fromkeys(frame_names))
            user = f"{frames}{text} It is a video of {scenes}."
        else:
            # Measured on held-out photos: the class names *after* the request keep the 135M LM on
            # subject more often than a "The picture shows: ..." preamble.
            user = f"{_MEDIA_MARK}\n{text} It is a photo of {', '.join(names)}."
        messages = [{"role": "system", "content": self.spec.system}, {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _people(self, media) -> str | None:
        """What the face detector says about the picture's people ("a portrait of a person", "two people"),
        or None: on a photo, or on a video's middle frame (one detection per prompt, ~20-45 ms)."""
        if self.faces is None:
            return None
        frame = media.frames[len(media.frames) // 2]
        return people_phrase(self.faces.detect(frame), frame.size)

    def build_prompt(self, media, text: str) -> Prompt:
        """Chat prompt with one placeholder position per visual token of each frame; the tokens ride in the
        payload."""
        visual, top, frame_names = (None, [], []) if media is None else self._see(media.frames)
        if media is not None and media.classes:  # a labelled training item: its labels, not the guess
            top = [(self._class_name(index), prob) for index, prob in media.classes]
            frame_names = [top[0][0]] * len(media.frames)
        chat = self._chat_text(media, top, frame_names, text)
        ids: list[int] = []
        spans = []
        pieces = chat.split(_MEDIA_MARK)
        per_frame = 0 if visual is None else visual.shape[1]  # the spans follow the payload they hold
        for i, piece in enumerate(pieces):
            ids += self.tokenizer(piece, add_special_tokens=False).input_ids
            if i < len(pieces) - 1:
                spans.append((len(ids), len(ids) + per_frame))
                ids += [self.placeholder_id] * per_frame
        return Prompt(torch.tensor([ids]), tuple(spans), visual, chat)

    # --- model --------------------------------------------------------------------------------
    def _new_cache(self) -> DynamicCache:
        return in_place_cache(self.lm.config) if self._lean is not None else DynamicCache(config=self.lm.config)

    def _run_lm(self, cache: DynamicCache, **inputs) -> torch.Tensor:
        """The LM's last hidden states [B, n, D] for ``inputs`` (``input_ids`` or ``inputs_embeds``,
        optional ``attention_mask`` and ``position_ids``), appended to ``cache``."""
        if self._lean is not None:
            return self._lean(cache, **inputs)
        return self.lm.model(past_key_values=cache, use_cache=True, **inputs).last_hidden_state

    @torch.inference_mode()
    def prefill(self, prompt: Prompt) -> PrefillOutput:
        embeds = self._prompt_embeds(prompt)  # [1, L, D]
        cache = self._new_cache()
        head = self._prompt_head() if self.prefix_cache else None
        if head is not None and prompt.input_ids[0, : len(head.ids)].tolist() == head.ids:
            # Every chat prompt opens with the same system turn: its keys/values are copied, not recomputed.
            for layer, (keys, values) in zip(cache.layers, head.keys_values, strict=True):
                layer.update(keys, values)
            rest = self._run_lm(cache, inputs_embeds=embeds[:, len(head.ids) :])[0]
            hidden = torch.cat([head.hidden, rest])  # [L, D]
        else:
            hidden = self._run_lm(cache, inputs_embeds=embeds)[0]  # [L, D]
        state = TargetState(cache=cache, length=prompt.length)
        return PrefillOutput(state, self.lm_head(hidden[-1]).float(), hidden)

    def _prompt_head(self) -> _PromptHead | None:
        """The chat template's constant opening (system turn, then the user turn's header), run once."""
        if self._head_cache is None:
            chat = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": self.spec.system}, {"role": "user", "content": _MEDIA_MARK}],
                tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(chat.split(_MEDIA_MARK)[0], add_special_tokens=False).input_ids
            cache = self._new_cache()
            hidden = self._run_lm(cache, input_ids=torch.tensor([ids]))[0]
            self._head_cache = _PromptHead(ids, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers],
                                           hidden)
        return self._head_cache

    @torch.inference_mode()
    def forward(self, state: TargetState, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._append(state, token_ids)

    supports_tree = True

    @torch.inference_mode()
    def forward_tree(self, state: TargetState, token_ids: torch.Tensor, mask: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A 4D boolean mask reaches the attention unchanged (LeanLlama and transformers alike).
        return self._append(state, token_ids, attention_mask=mask[None, None], position_ids=positions[None])

    def _append(self, state: TargetState, token_ids: torch.Tensor, **tree_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._run_lm(state.cache, input_ids=token_ids, **tree_inputs)[0]  # [n, D]
        state.length += token_ids.shape[1]
        return self.lm_head(hidden).float(), hidden

    @torch.inference_mode()
    def generate_batch(self, prompts: list[Prompt], configs: list) -> list[tuple[list[int], torch.Tensor]]:
        """Responses and hidden states for several (prompt, config) rows at once (left-padded batch).

        Used to build training data fast (a CPU decode step costs about the same for 1 row as for
        8); decoding loops never use it. ``configs[i]`` (a :class:`flash.engine.config.GenerationConfig`)
        decodes ``prompts[i]``; rows holding the *same* Prompt object share one prefill (a greedy
        and a sampled answer to one prompt cost one prefill), and finished rows leave the batch.
        Returns, per row, (response ids, h over prompt + response [L+R, D]).
        """
        unique = list({id(p): p for p in prompts}.values())
        slot = {id(p): i for i, p in enumerate(unique)}
        width = max(p.length for p in unique)
        embeds = torch.zeros(len(unique), width, self.hidden_size)
        mask = torch.zeros(len(unique), width, dtype=torch.long)
        for i, prompt in enumerate(unique):
            embeds[i, width - prompt.length :] = self._prompt_embeds(prompt)[0]
            mask[i, width - prompt.length :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = self._new_cache()
        out = self._run_lm(cache, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        # Expand the unique prefills to one cache row per request.
        pick = torch.tensor([slot[id(p)] for p in prompts])
        cache.batch_select_indices(pick)
        mask, next_pos = mask[pick], positions[pick, -1]
        hidden = [[out[slot[id(p)], width - p.length :]] for p in prompts]
        logits = self.lm_head(out[pick, -1]).float()
        generators = [make_generator(c.seed) for c in configs]
        responses: list[list[int]] = [[] for _ in prompts]

        def finished(row: int) -> bool:
            r = responses[row]
            return bool(r) and (r[-1] in self.eos_token_ids or len(r) >= configs[row].max_new_tokens)

        rows = list(range(len(prompts)))  # cache row i holds request rows[i]
        while rows:
            for i, row in enumerate(rows):
                if not finished(row):
                    row_logits = configs[row].rules.apply(logits[i : i + 1], responses[row], len(responses[row]))[0]
                    responses[row].append(choose_token(row_logits, configs[row], generators[row]))
            # Every row feeds its last token once more, even a finished one: training needs h there.
            ids = torch.tensor([[responses[row][-1]] for row in rows])
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            next_pos = next_pos + 1
            out = self._run_lm(cache, input_ids=ids, attention_mask=mask, position_ids=next_pos[:, None])
            logits = self.lm_head(out[:, -1]).float()
            for i, row in enumerate(rows):
                hidden[row].append(out[i])
            keep = [i for i, row in enumerate(rows) if not finished(row)]
            if len(keep) < len(rows):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                mask, next_pos, logits = mask[index], next_pos[index], logits[index]
                rows = [rows[i] for i in keep]
        return [(r, torch.cat(h)) for r, h in zip(responses, hidden, strict=True)]

    def _prompt_embeds(self, prompt: Prompt) -> torch.Tensor:
        """Input embeddings [1, L, D] with the visual tokens in the media spans."""
        embeds = self.embed(prompt.input_ids)
        for frame, (start, end) in enumerate(prompt.media_spans):
            embeds[0, start:end] = prompt.media_payload[frame]
        return embeds

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(token_ids)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(hidden)

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm.lm_head.weight.detach()

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


#: A class at least this likely is stated as what the picture shows; below it, offered as a guess.
CONFIDENT_CLASS_PROB = 0.5


def hedged_grounding(top: list[tuple[str, float]], scenes: list[str] | None = None,
                     people: str | None = None) -> str:
    """The classifier's view as one parenthesis that asserts only what it is sure of.

    ``top``: (class name, probability) pairs, most likely first: a class with probability at least
    :data:`CONFIDENT_CLASS_PROB` is stated ("(It shows an espresso.)"), otherwise the best two are
    offered ("(It may show a lion or a cheetah.)"). ``scenes``: a video's per-frame classes in order,
    when they change ("(It shows an espresso, then a drilling rig.)"). ``people``: what a face detector
    found ("a portrait of a person", "two people"), stated first. ImageNet has no person class, so on
    people the classifier names what they wear or hold (or guesses): its classes follow as what they
    are with, hedged as above ("(It shows a person with a tripod.)", "(It shows a portrait of a
    person, maybe with a suit or a kimono.)"). Told only "(It shows a portrait of a person.)", Qwen
    looped on skimage's astronaut ("a small, white umbrella" over and over); with the unsure class it
    wrote four sentences (one about a bobsleigh that is not there).
    """
    if people:
        if scenes:
            return f"(It shows {people}, with {', then '.join(_article(name) for name in scenes)}.)"
        if not top:
            return f"(It shows {people}.)"
        if top[0][1] >= CONFIDENT_CLASS_PROB:
            return f"(It shows {people} with {_article(top[0][0])}.)"
        return f"(It shows {people}, maybe with {' or '.join(_article(n) for n, _ in top[:2])}.)"
    if scenes:
        return f"(It shows {', then '.join(_article(name) for name in scenes)}.)"
    if not top:
        return ""
    name, prob = top[0]
    if prob >= CONFIDENT_CLASS_PROB:
        return f"(It shows {_article(name)}.)"
    return f"(It may show {' or '.join(_article(n) for n, _ in top[:2])}.)"


def _article(name: str) -> str:
    """``name`` with "a"/"an", except plurals ("sunglasses"; not "bus" or "glass")."""
    if name.endswith("s") and not name.endswith(("us", "ss")):
        return name
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


def _runs_through_lean_llama(*args, **kwargs):
    raise RuntimeError("this model's layers run through LeanLlama (EmbeddedTarget._run_lm); "
                       "load_embedded_target(lean=False, lm=...) keeps transformers' own modules")


def load_embedded_target(*, lm: str, quiet: bool = False, fp16_weights: bool = True, lean: bool = True,
                         cpu_ops: bool = True, prefix_cache: bool = True) -> EmbeddedTarget:
    """Assemble the embedded target on language model ``lm``, fetching and converting its weights on
    first use (the app's ``default`` preset is Qwen2.5: flash.models.EMBEDDED_MODELS).

    ``fp16_weights=False`` keeps the LM in fp32, ``lean=False`` runs transformers' own modules, KV
    cache and attention (slower; for comparisons), ``cpu_ops=False`` keeps torch's norms, rotary
    embedding and SDPA in the lean forward instead of FLASH's C++ ones (for comparisons),
    ``prefix_cache=False`` prefills every prompt whole. ``lm`` names the language model
    (:data:`EMBEDDED_LMS`: "smollm2" or "qwen2.5").
    """
    start = time.perf_counter()
    spec = EMBEDDED_LMS[lm]
    language_model, tok = _load_language_model(spec, quiet)
    vision = load_mobilenet_v2(str(fetch_weight(MOBILENET_V2, quiet=quiet)))
    labels = json.loads((ASSETS / "imagenet_labels.json").read_text())
    # Only the hedged grounding (Qwen's) names people: SmolLM2's prompts stay as they were.
    faces = load_face_detector(*(str(fetch_weight(w, quiet=quiet)) for w in MTCNN)) if spec.hedge else None
    target = EmbeddedTarget(language_model, tok, vision, labels, fp16_weights=fp16_weights, lean=lean,
                           cpu_ops=cpu_ops, spec=spec, prefix_cache=prefix_cache, faces=faces)
    if not quiet:
        print(f"Embedded model ({spec.key}) ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return target
