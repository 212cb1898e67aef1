"""Host-to-device copies of small index tensors drawn on the CPU, without a GPU synchronisation."""

from __future__ import annotations

import torch

__all__ = ["to_device_async"]


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without waiting for the GPU: a plain ``.to("cuda")`` of pageable
    memory (and ``non_blocking=True`` from pageable memory too) first waits for the GPU to finish its
    queue; staged through pinned memory the copy is queued like a kernel. Processors that draw indices on
    the host once per layer would otherwise drain the GPU once per layer."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
