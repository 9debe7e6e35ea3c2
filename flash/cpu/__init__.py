"""What makes the CPU path fast: FLASH's C++ kernels (``csrc/``, built on first use), fp16-weight
linear layers, the default model's lean Llama forward, grouped-KV attention and the rotary tables
(which the draft shares, on any device)."""
