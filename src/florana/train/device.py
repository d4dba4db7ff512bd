"""Devices and precision in one place: which device a run computes on, and how it computes there.

The `device` config key: `auto` (CUDA when a GPU is visible, else the CPU), `cpu`, `cuda` or `cuda:N`. Autocast
follows the device: with `bf16 = true`, bfloat16 on a CPU that computes it natively (AVX-512/AMX, Arm BF16: measured
1.4× faster than float32) and on GPUs that support it, float32 on other CPUs (where bfloat16 is emulated: 29×
slower than float32 on an AVX2-only EPYC), float16 with a GradScaler on GPUs without bfloat16; `bf16 = false` is
full float32 everywhere.

Determinism. Batches and client sampling come from NumPy generators seeded by (seed, round, client), and
`torch.manual_seed` seeds the generators of the CPU and of every CUDA device, so the LoRA and head init (drawn on
the CPU, then moved), dropout and fresh factors are the same draws on every run. On the CPU a run is bit for bit
repeatable with the same thread count (tested). On CUDA, cuBLAS and some backward kernels (atomic adds) may sum in
a different order from run to run, so two runs agree to float rounding rather than bit for bit, and a CUDA run
differs from a CPU run by more than rounding once training amplifies it; compare methods on one device.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from florana.config import DEVICE_NAME
from florana.errors import FloranaError


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a `device` config value; a clear error when CUDA is asked for but absent or out of
    range."""
    if not DEVICE_NAME.match(name):  # the config checks the syntax; whether it exists is checked here
        raise FloranaError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FloranaError(f"device = {name!r}, but this machine has no usable CUDA GPU (torch {torch.__version__}, "
                           f"CUDA build: {torch.version.cuda or 'none'}); use device = 'auto' or 'cpu'")
    count = torch.cuda.device_count()
    index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
    if index >= count:
        raise FloranaError(f"device = {name!r}, but this machine has {count} CUDA GPU(s) (cuda:0 … "
                           f"cuda:{count - 1})")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Precision:
    """How a run computes on its device: the autocast dtype (None: full float32) and, for float16, a GradScaler."""

    device: torch.device
    dtype: torch.dtype | None

    @property
    def scaled(self) -> bool:
        """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none."""
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        """What the run computes in, as its sessions record it: bfloat16, float16 or float32."""
        return str(self.dtype or torch.float32).removeprefix("torch.")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def scaler(self) -> torch.amp.GradScaler | None:
        """A fresh GradScaler for one client's training (float16 only)."""
        return torch.amp.GradScaler(self.device.type) if self.scaled else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware, as PyTorch's oneDNN judges it (AVX-512 or AMX on x86, BF16 on
    Arm); without it bfloat16 autocast is emulated and far slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def precision_for(device: torch.device, bf16: bool) -> Precision:
    """The precision policy: bf16 = false → float32; else bfloat16 autocast on a CPU that computes it natively and
    on GPUs that support it, float32 on other CPUs, float16 autocast with loss scaling on older GPUs."""
    if not bf16:
        return Precision(device, None)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(device, torch.float16)
    if device.type == "cpu" and not cpu_has_native_bf16():
        return Precision(device, None)
    return Precision(device, torch.bfloat16)


def on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that leave the model (uploads, server state, checkpoints, the wire) live on the CPU; a no-op there."""
    return {k: v.cpu() for k, v in tensors.items()}


def reset_peak_memory(device: torch.device) -> None:
    """Return cached GPU blocks to the driver and restart the peak counter (before a client trains); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset, in MiB; None on the CPU (RSS measures that)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
