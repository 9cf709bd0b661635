"""What the device can do: native bf16, the precision ``auto`` resolves to, autocast, peak FLOP/s and memory.

Mixed precision follows PyTorch's automatic mixed precision recipe (``torch.autocast`` with bfloat16, which needs
no loss scaling); MFU is the PaLM paper's model FLOPs utilisation (Chowdhery et al., 2022, appendix B) against the
peaks below.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch


def native_bf16(device_type: str) -> bool:
    """Whether the device computes bf16 natively (asked of torch: CUDA's capability, the CPU's AMX/AVX512-BF16)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_precision(precision: str, device_type: str) -> str:
    """``bf16`` or ``fp32``: what ``precision`` (``auto``, ``bf16``, ``fp32``) means on this device."""
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    return precision


def autocast_context(precision: str, device_type: str):
    if resolve_precision(precision, device_type) == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}
"""Dense bf16 tensor-core peaks (vendor datasheets, TFLOP/s) by GPU name, for MFU; ``GPTLAB_PEAK_TFLOPS``
overrides (and gives CPUs one)."""


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s for MFU: ``$GPTLAB_PEAK_TFLOPS`` or the table above; None when unknown."""
    override = os.environ.get("GPTLAB_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS_BF16.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator high-water mark, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
