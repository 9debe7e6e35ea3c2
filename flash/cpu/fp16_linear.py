"""Linear layers whose weights are stored in fp16 (fp32 in, fp32 out, fp32 accumulation).

Why: a CPU decoding step of the default model is memory-bound. Halving the bytes per weight nearly
halves a one-token step, and a packed fp16 kernel keeps a 3-5 token verification close to a one-token
step, where fp32 MKL pays 1.7-2x (``python research/verify_cost.py``) — the price a speculative step
has to beat. The kernel is FLASH's own (:mod:`flash.cpu.cpu_kernels`) where it can be built, else
fbgemm's, the one behind ``quantize_dynamic(..., dtype=torch.float16)`` (used directly because
``torch.ao.quantization`` is deprecated).
"""

from __future__ import annotations

import torch

from flash.cpu import cpu_kernels


def fp16_gemm_available() -> bool:
    """Whether an fp16-weight GEMM runs here: FLASH's kernel, or fbgemm's (x86 CPU torch builds)."""
    return cpu_kernels.enabled() or fbgemm_fp16_available()


def fbgemm_fp16_available() -> bool:
    """Whether this torch build has fbgemm's fp16 linear (x86 CPU builds do)."""
    try:
        torch.ops.quantized.linear_prepack_fp16(torch.zeros(1, 1), None)
    except (RuntimeError, AttributeError):
        return False
    return True


class Fp16Linear(torch.nn.Module):
    """Inference-only stand-in for an ``nn.Linear`` with its weight rounded to fp16 and pre-packed.

    ``backend`` is ``"flash"`` (:mod:`flash.cpu.cpu_kernels`) where that kernel runs, else ``"fbgemm"``.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.backend = "flash" if cpu_kernels.enabled() else "fbgemm"
        if self.backend == "flash":
            self._packed, self._bias = cpu_kernels.pack(linear.weight), bias
        else:
            self._packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Fp16Linear:
        """From a bare weight [out, in] and an optional bias [out] (kept in fp32)."""
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        return cls(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "flash":
            out = cpu_kernels.linear(x, self._packed, self.out_features)
            return out if self._bias is None else out.add_(self._bias)
        if x.dim() == 1:  # the kernel wants a batch dimension
            return torch.ops.quantized.linear_dynamic_fp16(x[None], self._packed)[0]
        return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=fp16 ({self.backend})"


def convert_linears(module: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by an :class:`Fp16Linear`, in place; returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Fp16Linear(child))
            count += 1
        else:
            count += convert_linears(child)
    return count
