"""FLASH: latent-aware semi-autoregressive speculative decoding for large multimodal models."""

__version__ = "0.1.0"
