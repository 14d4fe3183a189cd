"""What one run measures, taken through public interfaces only.

- `TimedConstraint` implements the constraint protocol (`ogpsa.plugin.constraint.Constraint`) by
  delegating every member to the method's own constraint, and times `build`, `project_grad` and
  `project_step`. It is handed to `OGPSACallback(settings, constraint=...)`, so the callback drives it
  as it drives any constraint: no method of the callback and no function of the plugin is replaced.
- `StepTimer`, a trainer callback, times optimizer steps (the interval between `on_step_end` events),
  counts the training tokens at the model's forward (a forward pre-hook), and at the end of an OGPSA
  run times builds (`OGPSACallback.rebuild`) against the bare passes over the same reference batches.
- `Recorder` holds what one run measured.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from transformers import TrainerCallback

from .copycheck import profile_call, state_bytes, state_tensors
from .device import peak_bytes, sync

# The bare passes over the reference batches that each method's build cannot do without: the
# gradient span needs their gradients, the null space only their inputs (a forward, no autograd).
RAW_PASS = {"gradient_span": "forward+backward", "null_space": "forward"}


class Recorder:
    """What one run measured: step intervals, build and projection times, tokens, the copy check."""

    def __init__(self, device: str, warmup: int, timed: int, rebuild_repeats: int = 1):
        self.device = device
        self.warmup, self.timed = warmup, timed
        self.rebuild_repeats = rebuild_repeats  # build/raw pairs timed after training (0: none)
        self.phase = "train"  # "end": the pairs timed after training; "done"
        self.in_build = False
        self.last_end: Optional[float] = None
        self.pending_build = 0.0  # seconds of builds inside the current step
        self.pending_proj: list[tuple[str, Any]] = []  # (call, seconds or a CUDA event pair) of the current step
        self.profile_now = False
        self.steps: list[dict] = []  # one per optimizer step
        self.builds: list[dict] = []  # {"step", "seconds", "phase", "followup"}
        self.build_fields: dict = {}  # the last build's fields of the "rebuild" log record
        self.profile: Optional[dict] = None
        self.profile_step: Optional[dict] = None  # the same step's project_step under the profiler (update target)
        self.profile_step_now = False
        self.grad_device = None
        self.tokens_real: Any = 0  # a device tensor once counted: read once, at the end (no sync per step)
        self.tokens_padded = 0
        self.extra: dict = {}

    def step_done(self, step: int, interval: float) -> None:
        by_call: dict[str, float] = {}
        for call, t in self.pending_proj:
            seconds = t[0].elapsed_time(t[1]) / 1000.0 if isinstance(t, tuple) else t
            by_call[call] = by_call.get(call, 0.0) + seconds
        self.steps.append({
            "step": step,
            "interval_s": interval,
            "rebuild_s": self.pending_build,
            "projection_s": sum(by_call.values()) if by_call else None,
            "project_grad_s": by_call.get("project_grad"),
            "project_step_s": by_call.get("project_step"),
        })
        self.pending_build, self.pending_proj = 0.0, []

    def train_tokens(self) -> tuple[int, int]:
        """(real, padded) positions of the training micro-batches so far."""
        return int(self.tokens_real), self.tokens_padded


class TimedConstraint:
    """A constraint that delegates to `inner` (the method's own) and times `build`, `project_grad` and
    `project_step` into `recorder`; `project_grad` of the profiling step runs under the copy check."""

    def __init__(self, inner, recorder: Recorder):
        self.inner, self.recorder = inner, recorder
        self.method = inner.method
        self.step_removed_key = inner.step_removed_key

    @property
    def followup_due(self) -> bool:
        return self.inner.followup_due

    def supports(self, layout) -> Optional[str]:
        return self.inner.supports(layout)

    def setup(self, ctx) -> None:
        self.recorder.grad_device = ctx.params[0].device if ctx.params else None
        self.inner.setup(ctx)

    def ready(self) -> bool:
        return self.inner.ready()

    def build(self, ctx) -> dict[str, Any]:
        rec = self.recorder
        sync(rec.device)
        t0 = time.perf_counter()
        rec.in_build = True
        try:
            fields = self.inner.build(ctx)
        finally:
            rec.in_build = False
        sync(rec.device)
        seconds = time.perf_counter() - t0
        rec.builds.append({"step": ctx.step, "seconds": seconds, "phase": rec.phase, "followup": ctx.followup})
        if rec.phase == "train":
            rec.pending_build += seconds  # taken out of the step it fell in
            rec.build_fields = dict(fields)
        return fields

    def project_grad(self, group: int, measure: bool) -> None:
        rec = self.recorder
        if rec.profile_now:  # the untimed last step: its real projection, under the profiler
            rec.profile_now = False
            rec.profile = profile_call(lambda: self.inner.project_grad(group, measure), rec.device, rec.grad_device,
                                       self.inner.state_dict)
            rec.profile_step_now = True  # and the step projection after optimizer.step, if the target has one
            return
        self._timed("project_grad", self.inner.project_grad, group, measure)

    def grad_record(self) -> Optional[dict[str, float]]:
        return self.inner.grad_record()

    def project_step(self, group: int) -> float:
        rec = self.recorder
        if rec.profile_step_now:  # the profiled step's other host reads: those of the step projection
            rec.profile_step_now = False
            result: dict = {}
            rec.profile_step = profile_call(lambda: result.setdefault("removed", self.inner.project_step(group)),
                                            rec.device, rec.grad_device, self.inner.state_dict)
            return result["removed"]
        return self._timed("project_step", self.inner.project_step, group)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.inner.load_state_dict(saved)

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def reshard(self, states, pieces, mine, device) -> dict[str, Any]:
        return self.inner.reshard(states, pieces, mine, device)

    def _timed(self, call: str, fn, *args):
        # In place: CUDA events on the GPU, so nothing extra is synchronised inside the step; a step's
        # calls are summed per call in `Recorder.step_done`.
        rec = self.recorder
        if rec.device == "cuda":
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
            rec.pending_proj.append((call, (start, end)))
        else:
            t0 = time.perf_counter()
            out = fn(*args)
            rec.pending_proj.append((call, time.perf_counter() - t0))
        return out


class StepTimer(TrainerCallback):
    """Times a run's steps into `recorder`. callback: the run's OGPSACallback (None for a plain stage),
    whose constraint is a `TimedConstraint`; after training it times builds against raw passes."""

    def __init__(self, recorder: Recorder, callback=None):
        self.recorder = recorder
        self.callback = callback
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        sync(self.recorder.device)
        self.recorder.last_end = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        rec = self.recorder
        rec.profile_now = state.global_step == rec.warmup + rec.timed  # the last step: profiled, not timed

    def on_step_end(self, args, state, control, **kwargs):
        rec = self.recorder
        sync(rec.device)
        now = time.perf_counter()
        rec.step_done(state.global_step, now - rec.last_end)
        rec.last_end = now

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rec = self.recorder
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        sync(rec.device)
        rec.extra["peak_bytes"] = peak_bytes(rec.device)
        if self.callback is not None:
            self._after_training(args, state, model)

    def _count_tokens(self, module, args, kwargs):
        """Real (attention mask) and padded positions of each training micro-batch, as the model gets it:
        the SFT batch, or DPO's chosen and rejected concatenated."""
        rec = self.recorder
        ids = kwargs.get("input_ids", args[0] if args else None)
        if rec.in_build or rec.phase != "train" or ids is None:
            return None
        mask = kwargs.get("attention_mask")
        # summed on the device, read once after training: a read per micro-batch would synchronise the GPU
        rec.tokens_real = rec.tokens_real + (mask.sum() if mask is not None and mask.dim() == 2 else ids.numel())
        rec.tokens_padded += ids.numel()
        return None

    def _after_training(self, args, state, model) -> None:
        rec, cb = self.recorder, self.callback
        constraint = cb.constraint
        saved = constraint.state_dict()
        batch_size = cb.settings.ogpsa_reference_batch_size or args.per_device_train_batch_size
        fields = rec.build_fields
        rec.extra.update({
            "state_bytes": state_bytes(saved),
            "state_dtypes": sorted({str(t.dtype) for t in state_tensors(saved)}),
            "basis_bytes": fields.get("basis_bytes"),
            # the last training build's summary (per-set and per-layer fields left out)
            "build": {k: v for k, v in fields.items() if "/" not in k},
            "trainable_numel": sum(p.numel() for p in cb.params),
            "largest_tensor_numel": max(p.numel() for p in cb.params),
            "trainable_tensors": len(cb.params),
            "ref_batches": sum(-(-len(r.features) // batch_size) for r in cb.refs),
            "ref_tokens": sum(len(f["input_ids"]) for r in cb.refs for f in r.features),
            "ref_input_tokens": sum(v for k, v in fields.items() if k.startswith("input_tokens/")),
            "ref_padded_tokens": sum(v for k, v in fields.items() if k.startswith("padded_tokens/")),
        })
        del saved
        kind = RAW_PASS.get(constraint.method, "forward+backward")
        rec.extra["raw_pass"] = kind
        raw, builds = [], []
        rec.phase = "end"
        for _ in range(rec.rebuild_repeats):
            raw.append(raw_pass(cb, model, rec.device, batch_size, backward=kind == "forward+backward"))
            n = len(rec.builds)
            cb.rebuild(args, state, model)
            builds.append(rec.builds[n]["seconds"] if len(rec.builds) > n else None)
        rec.extra["raw_s"] = raw
        rec.extra["rebuild_end_s"] = builds
        rec.phase = "done"


def raw_pass(callback, model, device: str, batch_size: int, backward: bool = True) -> float:
    """Seconds of the bare passes a build needs over its reference batches (the callback's sets, collator
    and batch size; this model), nothing else: forward+backward in train mode (no norms, no basis), or
    a forward in eval mode without autograd (no covariances, no decomposition)."""
    import torch
    from ogpsa.plugin.reference import shard_batches

    params = callback.params
    dev = params[0].device
    was_training = model.training
    model.train(backward)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        sync(device)
        t0 = time.perf_counter()
        for ref in callback.refs:
            for batch, _ in shard_batches(ref, batch_size, callback.collator, dev):
                if backward:
                    model(**batch).loss.backward()
                else:
                    with torch.no_grad():
                        model(**{k: v for k, v in batch.items() if k != "labels"})
            for p in params:
                p.grad = None
        sync(device)
        seconds = time.perf_counter() - t0
    model.train(was_training)
    return seconds
