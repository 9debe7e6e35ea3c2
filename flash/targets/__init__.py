"""Target models behind one interface (:mod:`flash.targets.base`): the embedded CPU models, the
Hugging Face LLaVA and Qwen2.5-VL adapters, and the KV cache they share.

Nothing is imported here: the adapters pull in transformers and their weights' loaders, which a
caller that needs only the interface should not pay for.
"""
