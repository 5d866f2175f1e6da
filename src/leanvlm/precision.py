"""The precision a machine computes fastest in. bf16 halves memory traffic, but only hardware that multiplies it
natively makes it fast: CUDA GPUs that support it, and CPUs with AMX or AVX512-BF16. Elsewhere torch computes bf16
matrix products through fp32 conversions, several times slower than fp32 itself (4.7x on a 2-core AVX-512 Xeon
without them: 60 against 280 GFLOPS), so `auto` picks fp32 there."""

from __future__ import annotations

import torch

AUTO = "auto"


def native_bf16(device: str | torch.device | None = None) -> bool:
    """Whether `device` (default: CUDA when present, else the CPU) multiplies bf16 natively."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # torch's CPU feature checks (private helpers, in torch since 2.3); a build without them answers no
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_mixed_precision(value: str, device: str | torch.device | None = None) -> str:
    """A recipe's `mixed_precision` for this machine: `auto` becomes "bf16" where bf16 is native, else "no"."""
    if value != AUTO:
        return value
    return "bf16" if native_bf16(device) else "no"


def dtype_name(name: str, device: str | torch.device | None = None) -> str:
    """A dtype's name for this machine: `auto` becomes "bfloat16" where it is native, else "float32"."""
    if name != AUTO:
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """A dtype by name ("bfloat16", "float32", ..., or `auto`, as `dtype_name` resolves it)."""
    return getattr(torch, dtype_name(name, device))
