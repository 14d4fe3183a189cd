"""Host/device copies inside one real projection call: the call runs under torch.profiler, and every
tensor of the constraint's state is checked to sit on the gradients' device."""

from __future__ import annotations

import math
from typing import Any, Callable

from .device import sync

LARGE_COPY = 4096  # elements: a statistics vector is a few floats; a basis or gradient slice is far larger


def state_tensors(state: Any) -> list:
    """The tensors in a constraint's `state_dict()` (nested dicts, lists, tuples), each once."""
    import torch

    found, seen, stack = [], set(), [state]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            key = (x.data_ptr(), x.numel(), x.dtype, str(x.device))
            if key not in seen:
                seen.add(key)
                found.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return found


def state_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in state_tensors(state))


def profile_call(call: Callable[[], Any], device: str, grad_device, state: Callable[[], Any]) -> dict:
    """Run `call` (the step's real `project_grad`) under torch.profiler; count copies and syncs, and
    check that the tensors of `state()` (read after the call: some are made by it) are on grad_device."""
    import torch

    out: dict = {}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    names = None
    started = ran = False
    sync(device)
    try:
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            started = True
            call()
            ran = True
            sync(device)
    except Exception as e:  # noqa: BLE001  the profiler failed to start or stop (e.g. CUPTI): no counts
        if started and not ran:
            raise  # the projection itself failed
        out["profiler_error"] = repr(e)
        if not ran:
            call()  # the step still needs its projection, once
    else:
        events = list(prof.events())
        names = [e.name for e in events]

        def largest(e) -> int:
            return max((math.prod(s) for s in (e.input_shapes or []) if s), default=0)

        copies = [e for e in events if e.name in ("aten::copy_", "aten::_to_copy", "aten::to")]
        out["copy_numels"] = sorted({largest(e) for e in copies})
        # A new tensor made by a dtype or device conversion (`.to`, `.float`, `.cpu` run `_to_copy`). An
        # in-place `copy_` into an existing tensor of the same device (how a projection may write its
        # result back) is counted apart: it crosses no boundary, and on CUDA a crossing is a Memcpy event.
        out["large_copies"] = sum(1 for e in events if e.name == "aten::_to_copy" and largest(e) > LARGE_COPY)
        out["large_inplace_copies"] = sum(1 for e in events if e.name == "aten::copy_" and largest(e) > LARGE_COPY)

        def count(*keys):
            return sum(1 for n in names if any(k in n for k in keys))

        out["events"] = len(names)
        out["memcpy_htod"] = count("Memcpy HtoD")
        out["memcpy_dtoh"] = count("Memcpy DtoH")
        out["memcpy_dtod"] = count("Memcpy DtoD")
        out["aten_copy_"] = count("aten::copy_")
        out["aten_to_copy"] = count("aten::_to_copy")
        out["cuda_memcpy_calls"] = count("cudaMemcpy")
        out["cuda_sync_calls"] = count("cudaStreamSynchronize", "cudaDeviceSynchronize")
        out["kernel_launches"] = count("cudaLaunchKernel", "cuLaunchKernel")
        out["aten_addmv_"] = count("aten::addmv_")
        out["aten_mv"] = count("aten::mv")
    tensors = state_tensors(state())
    out["state_tensors"] = len(tensors)
    out["state_on_grad_device"] = bool(grad_device is not None and tensors and all(t.device == grad_device for t in tensors))
    out["grad_device"] = str(grad_device)
    if device == "cuda":
        ok = (out["state_on_grad_device"] and names is not None and out["memcpy_htod"] == 0
              and out["memcpy_dtoh"] <= 1 and out["large_copies"] == 0)
        out["method"] = ("torch.profiler (CPU+CUDA, record_shapes) over the last step's real project_grad (not a "
                         "timed step): Memcpy HtoD = 0, Memcpy DtoH <= 1 (one read of the statistics), no "
                         f"conversion (_to_copy) of more than {LARGE_COPY} elements, and every tensor of the "
                         "constraint's state_dict() on the gradient's device")
    else:
        ok = out["state_on_grad_device"] and names is not None and out["large_copies"] == 0
        out["method"] = ("CPU (no host/device boundary): every tensor of the constraint's state_dict() on the "
                         "gradient's device, and torch.profiler (record_shapes) over the last step's real "
                         f"project_grad (not a timed step) shows no conversion (_to_copy) of more than {LARGE_COPY} "
                         "elements")
    out["ok"] = bool(ok)
    return out
