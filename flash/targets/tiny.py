"""Tiny random LLaVA and Qwen2.5-VL targets with local word-level tokenizers (no network), for tests
and docs: real transformers classes at a small size, their weights fixed by a seed."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from flash.targets.llava import LLAVA_CHAT_TEMPLATE, LlavaTarget
from flash.targets.qwen2_5_vl import QWEN_CHAT_TEMPLATE, Qwen25VLTarget


def _config_name(prefix: str, config: Any, seed: int) -> str:
    """A stable name for a random model: its config and seed fully determine its weights."""
    digest = hashlib.sha1(f"{config.to_json_string(use_diff=False)}|{seed}".encode()).hexdigest()
    return f"{prefix}-{digest[:12]}"


_WORDS = [
    "the", "a", "an", "is", "are", "was", "of", "and", "to", "in", "on", "at", "with", "for", "it",
    "this", "that", "there", "image", "video", "picture", "photo", "shows", "show", "describe",
    "what", "happens", "detail", "details", "cat", "dog", "bird", "horse", "person", "man", "woman",
    "child", "people", "car", "road", "street", "tree", "trees", "sky", "sun", "cloud", "water",
    "sea", "river", "house", "building", "room", "table", "chair", "window", "red", "blue", "green",
    "yellow", "white", "black", "brown", "small", "large", "big", "old", "young", "left", "right",
    "top", "bottom", "front", "behind", "near", "next", "standing", "sitting", "walking", "running",
    "looking", "holding", "wearing", "playing", "background", "foreground", "scene", "frame",
    "frames", "moves", "moving", "then", "first", "next", "finally", "one", "two", "three", "many",
    "some",
]  # fmt: skip
_PUNCT = [".", ",", ":", "!", "?", "'", "-", "(", ")"]
_TINY_VOCAB = 384  # tokenizer vocabulary = model vocabulary, padded with filler words


def _tiny_tokenizer(special: list[str], chat_template: str, eos: str) -> Any:
    """A word-level fast tokenizer over a fixed vocabulary, with ``special`` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<unk>", "<pad>", *special]
    vocab: dict[str, int] = {}
    template_words = ["USER", "ASSISTANT", "system", "user", "assistant", "You", "helpful"]
    for word in base + template_words + _WORDS + _PUNCT:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), _TINY_VOCAB):
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token=eos,
        additional_special_tokens=special,
        chat_template=chat_template,
    )


def _seeded(seed: int, build: Any) -> Any:
    """Build a model with torch's global RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa") -> LlavaTarget:
    """A tiny random LLaVA (CLIP 56 px / 14 px patches -> 16 tokens per image, Llama 64-d x 2).

    ``attn_implementation`` does not change the weights (nor the name, which names the weights)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _tiny_tokenizer(["<s>", "</s>", "<image>"], LLAVA_CHAT_TEMPLATE, eos="</s>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    eos_id = tokenizer.eos_token_id
    text = LlamaConfig(
        vocab_size=_TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1,  # larger than the default 0.02: less degenerate, position-sensitive
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
        eos_token_id=eos_id,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=56, patch_size=14, projection_dim=32,
    )  # fmt: skip
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_id=image_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    model = _seeded(seed, lambda: LlavaForConditionalGeneration(config))
    model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    return LlavaTarget(model, processor, _config_name("llava-tiny", config, seed))


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa") -> Qwen25VLTarget:
    """A tiny random Qwen2.5-VL (2-layer 32-d vision tower, 64-d x 2 text model, small pixel budgets).

    ``attn_implementation`` does not change the weights (nor the name, which names the weights)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
    tokenizer = _tiny_tokenizer(special, QWEN_CHAT_TEMPLATE, eos="<|im_end|>")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in special}
    eos_id = ids["<|im_end|>"]
    text = {
        "vocab_size": _TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "initializer_range": 0.1,  # larger than the default: the test models react to wrong positions
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos_id, "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    vision = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 4, "window_size": 56,
        "out_hidden_size": 64, "fullatt_block_indexes": [1],
    }  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    model = _seeded(seed, lambda: Qwen2_5_VLForConditionalGeneration(config))
    model.set_attn_implementation(attn_implementation)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    return Qwen25VLTarget(
        model, tokenizer, image_processor, _config_name("qwen2.5-vl-tiny", config, seed),
        video_min_pixels=56 * 56, video_max_pixels=84 * 84, chat_template=QWEN_CHAT_TEMPLATE,
    )  # fmt: skip
