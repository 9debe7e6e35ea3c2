"""FLASH's CPU kernels, built on first use: an fp16-weight GEMM for decoding
(``flash/cpu/csrc/fp16_gemm.cpp``) and the default model's layer ops (``flash/cpu/csrc/layer_ops.cpp``).

Why not only fbgemm: its fp16 GEMM pays ~20-30 us of fixed cost per call (121 calls per decoding
step) and at 4-6 rows it runs far from the FMA units' peak, which is what a verification pass needs.
This kernel streams each packed 16-column weight block once (prefetched 8 KB ahead), converts it in
registers and applies it to up to six rows: a decoding step's 121 GEMMs, weights streamed from memory
as in decoding, take 20.5 vs 25.5 ms at 1 row and 21.8 vs 31.7 ms at 5 (``python research/gemm_cost.py``,
which also times each shape with its weights in cache; ``research/verify_cost.py`` has the whole
forward). It also makes each output row independent of the other rows in the call, bit for bit.
Where the CPU has AVX-512 the same GEMM runs on 512-bit registers (one conversion and M FMAs per
weight step instead of two and 2M; up to 12 rows in one chunk; a prefill converts blocks in pairs):
each output is still one fp32 FMA chain over K from zero, so both paths give the same floats (tested);
``FLASH_NO_AVX512=1`` keeps the AVX2 path (comparisons).

The same library holds FLASH's C++ layer ops (``flash/cpu/csrc/layer_ops.cpp``: RMSNorm, rotary
embedding, decoding attention; :func:`rms_norm`, :func:`rope_qk`, :func:`decode_attention`), which
the default model's lean forward uses where the library loads.

It is compiled with the system C++ compiler against the installed torch (~40 s, once per source and
torch version; cached under ``$FLASH_CACHE/kernels``). Where that cannot happen (no compiler, a CPU
without AVX2/FMA/F16C, another OS), :class:`flash.cpu.fp16_linear.Fp16Linear` runs fbgemm's kernel and the
lean forward torch's ops, after a one-line notice; ``FLASH_FP16_KERNEL=fbgemm`` switches the GEMM only.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from flash.weights import cache_dir

SOURCES = tuple(Path(__file__).resolve().parent / "csrc" / name for name in ("fp16_gemm.cpp", "layer_ops.cpp"))
#: Output columns per packed weight block (must match ``kCols`` in the source).
BLOCK_COLUMNS = 16
#: Set (to anything) to keep the GEMM on its AVX2 path on a CPU with AVX-512; read at every call.
NO_AVX512_ENV = "FLASH_NO_AVX512"
#: Set to ``fbgemm`` to skip this kernel (comparisons, or a machine where it misbehaves).
BACKEND_ENV = "FLASH_FP16_KERNEL"
# No FMA contraction outside the explicit intrinsics: layer_ops.cpp's rotary embedding rounds each
# product as torch does, so it computes flash.cpu.rope.apply_rope's numbers exactly.
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


class KernelBuildError(RuntimeError):
    """The kernel could not be built or loaded here."""


def enabled() -> bool:
    """Whether new :class:`flash.cpu.fp16_linear.Fp16Linear` layers use this kernel: it runs here and
    ``FLASH_FP16_KERNEL`` is not ``fbgemm`` (read at each layer's creation, so one process can
    compare both)."""
    return os.environ.get(BACKEND_ENV, "").lower() != "fbgemm" and kernel_available()


@functools.cache
def kernel_available() -> bool:
    """Build (once) and load the kernel; False, after one line on stderr saying why, where it cannot run."""
    try:
        _check_cpu()
        torch.ops.load_library(str(build()))
    except (KernelBuildError, OSError, RuntimeError) as exc:
        print(f"note: FLASH's CPU kernels are not used ({exc}); falling back to fbgemm's GEMM and torch's ops, "
              f"which are slower", file=sys.stderr)
        return False
    return True


def _check_cpu() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        raise KernelBuildError(f"built for x86-64 Linux only, this is {platform.system()} {platform.machine()}")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise KernelBuildError("the CPU has no AVX2")
    flags = Path("/proc/cpuinfo").read_text().split()
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    if missing:
        raise KernelBuildError(f"the CPU lacks {', '.join(missing)}")


def compile_command(compiler: str, sources: list[str], output: str) -> list[str]:
    """The command line that compiles C++ ``sources`` into ``output``, a library linked against torch."""
    from torch.utils import cpp_extension

    lib_dir = cpp_extension.library_paths()[0]
    return [compiler, *_flags(), *(f"-I{p}" for p in cpp_extension.include_paths()), *sources, "-o", output,
            f"-L{lib_dir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib_dir}"]


def _flags() -> list[str]:
    """The compiler flags: FLASH's, and torch's C++ ABI (both part of the build's cache key)."""
    return [*_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def build() -> Path:
    """The compiled library for this source, torch and compiler flags; compiles it when missing."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler ('{compiler}'); install g++ or set CXX")
    sources = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + torch.__version__.encode() + " ".join(_flags()).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"flash_cpu-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    print("Compiling FLASH's CPU kernels (once, ~40 s)...", file=sys.stderr)
    # Built under a temporary name and renamed: a concurrent process never loads a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        done = subprocess.run(compile_command(compiler, [str(s) for s in SOURCES], tmp), capture_output=True,
                              text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line.lower()] or done.stderr.splitlines()
            raise KernelBuildError(f"compiling {' and '.join(s.name for s in SOURCES)} failed: "
                                   f"{errors[0] if errors else done.returncode}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


@functools.cache
def has_avx512() -> bool:
    """Whether this CPU has AVX-512F, which the GEMM's wider path needs (Linux: /proc/cpuinfo)."""
    try:
        return " avx512f " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """Weight [N, K] -> fp16 [ceil(N/16), K, 16]: each block of 16 output columns one contiguous stream."""
    n, k = weight.shape
    blocks = -(-n // BLOCK_COLUMNS)
    weight = weight.detach()
    if blocks * BLOCK_COLUMNS != n:
        weight = torch.nn.functional.pad(weight, (0, 0, 0, blocks * BLOCK_COLUMNS - n))
    # One strided copy that rounds and transposes together, instead of rounding into a zeroed fp16
    # buffer and transposing that: Qwen2.5's 151936 x 896 head packs in ~140 ms instead of ~215 ms on
    # a quiet 2-core machine (the whole model's load, ~1.8 s warm, does not change measurably); under
    # memory pressure (two distillation processes beside it) the old way took 6.1 s, this one 0.3 s.
    packed = torch.empty(blocks, k, BLOCK_COLUMNS, dtype=torch.float16)
    packed.copy_(weight.view(blocks, BLOCK_COLUMNS, k).transpose(1, 2))
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., K] (fp32) @ the packed weight's transpose -> [..., out_features] (fp32)."""
    return torch.ops.flash_fp16.linear(x, packed, out_features)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` in one call (fp32; ``layer_ops.cpp``): torch's CPU
    ``rms_norm`` is six ops. Within float rounding of torch's (another summation order), row by row."""
    return torch.ops.flash_ops.rms_norm(x, weight, eps)


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
            kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The q and k heads of a fused projection ``qkv`` [B, n, (heads + 2 kv_heads) d], rotated:
    (q [B, heads, n, d], k [B, kv_heads, n, d]); ``cos``/``sin`` [B, n, d]. Bit for bit
    :func:`flash.cpu.rope.apply_rope`, in one call instead of seven."""
    return torch.ops.flash_ops.rope_qk(qkv, cos, sin, heads, kv_heads)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Attention of a few queries over one sequence's KV cache (``layer_ops.cpp``): q [1, H, n, d],
    k/v [1, H_kv, L, d] (grouped heads kept grouped), ``mask`` additive [n, L] or None (causal, the
    queries last). Returns [1, n, H, d]. Each query's result is independent of the others in the call."""
    return torch.ops.flash_ops.decode_attention(q, k, v, mask, scale)
