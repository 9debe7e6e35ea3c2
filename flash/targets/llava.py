"""The LLaVA (1.5-style) target: ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

Media spans: one per image; a video is fed as its frames, one ``<image>`` per frame, so one span per
frame.
"""

from __future__ import annotations

import os
from typing import Any

from flash.targets.base import Prompt
from flash.targets.hf import HFTarget, carve_spans, fetch_pretrained, placeholder_runs, rgb_frames

#: LLaVA-1.5 conversation format, used when the processor ships no chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaTarget(HFTarget):
    """``LlavaForConditionalGeneration`` + ``LlavaProcessor``. Videos go in as one image per frame."""

    def __init__(self, model: Any, processor: Any, name: str) -> None:
        super().__init__(model, processor.tokenizer, name)
        self.processor = processor
        self.image_token_id = int(model.config.image_token_id)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Weights plus the processor (tokenizer, image processor, chat template)."""
        super().save_pretrained(path)
        self.processor.save_pretrained(path)

    def build_prompt(self, media: Any, text: str) -> Prompt:
        """Chat-template ``text`` with one image entry per frame; expand and tokenize via the processor."""
        frames = rgb_frames(media) if media is not None else []
        content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        template = None if getattr(self.processor, "chat_template", None) else LLAVA_CHAT_TEMPLATE
        rendered = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=template
        )
        batch = self.processor(text=rendered, images=frames or None, return_tensors="pt")
        input_ids = batch["input_ids"].long()
        # Everything but the ids goes to the model (pixel_values, and image_sizes where produced).
        payload = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        spans: tuple[tuple[int, int], ...] = ()
        if frames:
            runs = placeholder_runs(input_ids[0], self.image_token_id)
            total = sum(end - start for start, end in runs)
            # LLaVA-1.5 crops every image to the same size, so every frame gets the same count.
            spans = carve_spans(runs, [total // len(frames)] * len(frames))
        return Prompt(input_ids=input_ids, media_spans=spans, media_payload=payload, text=rendered)


def load_llava(model_id: str, name: str, kwargs: dict[str, Any]) -> LlavaTarget:
    """A LLaVA checkpoint with its processor; ``kwargs`` go to ``from_pretrained`` (dtype, device map...)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = fetch_pretrained(AutoProcessor.from_pretrained, model_id)
    model = fetch_pretrained(LlavaForConditionalGeneration.from_pretrained, model_id, **kwargs)
    return LlavaTarget(model.eval(), processor, name)
