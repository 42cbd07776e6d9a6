"""Devices and precision: autocast, bf16 detection, seeds, the distributed world."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def autocast(device: torch.device | str, bf16: bool = False, fp16: bool = False):
    """Autocast for the chosen dtype, or a no-op context in fp32."""
    device_type = torch.device(device).type
    if bf16 or fp16:
        return torch.autocast(device_type, dtype=torch.bfloat16 if bf16 else torch.float16)
    return nullcontext()


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 units (AVX512-BF16 or AMX-BF16), where bf16 autocast is faster than fp32
    rather than emulated: torch's own check where it has one, else the kernel's CPU flags."""
    check = getattr(getattr(torch.backends, "mkldnn", None), "is_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except Exception:  # an older torch without the probe on this platform
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def auto_precision() -> str:
    """bf16 where the device computes it natively (a CUDA GPU with bf16, or a CPU with bf16 units), else fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, created): under torchrun (WORLD_SIZE > 1) a process group, gloo for the CPU
    tensors this script sends, and one GPU per rank (LOCAL_RANK) when there are GPUs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True
