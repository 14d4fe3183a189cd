#!/usr/bin/env python
"""OGPSA overhead benchmark: plain `sft`/`dpo` against `ogpsa_sft`/`ogpsa_dpo` on the same model and data.

    python benchmarks/run.py                                   # CPU: sizes 10m,50m, a few minutes
    python benchmarks/run.py --quick --sizes 10m --out /tmp/b  # smoke run (the test)
    python benchmarks/run.py --device cuda --sizes 500m        # one GPU, bf16

Every run goes through LLaMA-Factory's own `run_exp` in this process (the OGPSA stages are armed
with `ogpsa.pipelines.integration.hook.arm()`), with a timing callback attached. What is measured, per
model size and stage pair, in each repeat (runs interleaved: sft, ogpsa_sft, dpo, ogpsa_dpo):

- step time: the interval between consecutive `on_step_end` events (synchronised on CUDA), i.e.
  a whole optimizer step as the trainer runs it (data, forward/backward, clipping, projection,
  optimizer, callbacks); warm-up steps are dropped, the last step is kept apart for profiling.
  OGPSA steps are reported without rebuilds (the rebuild's own time, measured by a wrapper around
  `OGPSACallback.rebuild`, is subtracted from the step it fell in) and amortised at the paper's
  refresh interval K (30 SFT, 5 DPO): step + rebuild / K.
- projection alone: the projection calls inside the real step (`project_`, plus `span_coordinates`
  and `project_change_` with the default ogpsa_target=update), timed in place (CUDA events on the
  GPU, so nothing extra is synchronised; perf_counter on CPU), as a % of the plain step.
- rebuild vs raw: at the end of the OGPSA run, a rebuild and a bare forward+backward over the same
  reference batches (same collator, batch size, model; no basis, no norms, no bookkeeping), in
  turn, several times.
- memory: peak of each run (CUDA max_memory_allocated; CPU peak RSS = VmHWM, reset per run via
  /proc/self/clear_refs, falling back to getrusage's process-lifetime maximum) and the basis's
  `SubspaceBasis.nbytes()`.
- host/device copies: one `project_` call of the last step under torch.profiler, counting memcpy
  and copy events, plus a check that every basis tensor is on the gradient's device.

Writes <out>/bench.json (everything) and <out>/bench.md (the table), atomically, and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

from ogpsa.plugin.files import write_atomic, write_json_atomic

# Model presets: random-initialised Qwen2 (tied embeddings), parameter counts close to the names.
# The vocabulary is larger than the toy tokenizer's (as Qwen's own 151936 > len(tokenizer)):
# rows beyond the tokenizer are never input, but the LM head still scores them.
SIZES = {
    "10m": {"hidden": 256, "layers": 8, "inter": 1024, "heads": 4, "kv": 2, "vocab": 8192},
    "50m": {"hidden": 512, "layers": 11, "inter": 2048, "heads": 8, "kv": 2, "vocab": 16384},
    "150m": {"hidden": 768, "layers": 14, "inter": 3072, "heads": 12, "kv": 4, "vocab": 32768},
    "500m": {"hidden": 896, "layers": 24, "inter": 4864, "heads": 14, "kv": 2, "vocab": 151936},  # Qwen2(.5)-0.5B
    "1.5b": {"hidden": 1536, "layers": 28, "inter": 8960, "heads": 12, "kv": 2, "vocab": 151936},  # Qwen2.5-1.5B
}
PAPER_K = {"sft": 30, "dpo": 5}
REFS = ["bench_math_ref", "bench_general_ref", "bench_hhh_ref"]
TARGET_PROJ_PCT = 3.0
TARGET_REBUILD_RATIO = 1.2
TARGET_FLAT_PP = 1.0  # "flat": no size's projection % exceeds the smallest size's by more than this
# Memory bound: OGPSA's peak <= the plain run's peak + the basis + one float32 tensor the size of the
# largest trainable parameter (the scratch of one tensor's projection or upcast, never a whole gradient)
SCRATCH_BYTES_PER_ELEMENT = 4
LARGE_COPY = 4096  # elements: the .tolist() packs m + 3 floats; a basis or gradient slice is far larger

ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DISABLE_VERSION_CHECK": "1",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}

# ---------------------------------------------------------------------------------------------
# helpers


def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _malloc_trim() -> None:
    """Give freed heap back to the OS (glibc), so a run's RSS baseline is not the last run's leftovers."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak(device: str) -> str:
    """Reset the peak-memory counter; returns the method used."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return "torch.cuda.max_memory_allocated (reset per run)"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return "peak RSS: VmHWM from /proc/self/status, reset per run via /proc/self/clear_refs"
    except OSError:
        return "peak RSS: resource.getrusage ru_maxrss (process-lifetime maximum, not reset per run)"


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _current_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# assets: tokenizer (toy), datasets (lengthened toy data), models (random Qwen2 per size)


# Reference answer lengths as fractions of cutoff_len, from real sets at cutoff 512 (tokens: GSM8K
# 134-414, Alpaca 38-512, BIG-bench HHH 46-512): rebuild cost depends on how unevenly they pad.
REF_SPREAD = {"bench_math_ref": (134 / 512, 414 / 512), "bench_general_ref": (38 / 512, 1.0),
              "bench_hhh_ref": (46 / 512, 1.0)}


def build_data(root: Path, seq_len: int, ref_samples: int, n_train: int = 64, ref_lengths: str = "spread") -> str:
    """Bench datasets in root/data: SFT, DPO (ranking), three reference sets. Training answers run to
    ~seq_len tokens; reference answers too (`equal`) or over REF_SPREAD (`spread`, uniform)."""
    import random

    from ogpsa.data_prep import tiny

    rows = tiny.build_rows(seed=0)
    rng = random.Random(0)
    filler = [r["output"] for k in ("toy_general_ref", "toy_hhh_ref", "toy_math_ref", "toy_benign_eval") for r in rows[k]]
    target = seq_len * 4  # characters; the toy BPE averages < 4 characters a token, cutoff_len trims

    def long(text: str, fraction: float = 1.0) -> str:
        parts = [text]
        while sum(len(p) + 1 for p in parts) < target * fraction:
            parts.append(rng.choice(filler))
        return " ".join(parts)

    def cycle(src, n):
        return [src[i % len(src)] for i in range(n)]

    data = {
        "bench_sft": [{"instruction": r["instruction"], "input": "", "output": long(r["output"])}
                      for r in cycle(rows["toy_safety_sft"], n_train)],
        "bench_dpo": [{"instruction": r["instruction"], "input": "", "chosen": long(r["chosen"]),
                       "rejected": long(r["rejected"])} for r in cycle(rows["toy_safety_dpo"], n_train)],
    }
    for name, src in zip(REFS, ("toy_math_ref", "toy_general_ref", "toy_hhh_ref")):
        lo, hi = REF_SPREAD[name] if ref_lengths == "spread" else (1.0, 1.0)
        data[name] = [{"instruction": r["instruction"], "input": "", "output": long(r["output"], rng.uniform(lo, hi))}
                      for r in cycle(rows[src], ref_samples)]
    data_dir = root / "data"
    for name, r in data.items():
        write_json_atomic(data_dir / f"{name}.json", r)
    write_json_atomic(data_dir / "dataset_info.json", tiny.dataset_info(data))
    return str(data_dir)


def build_model(root: Path, size: str, tokenizer_dir: str, dtype_name: str) -> tuple[str, int]:
    """Random-init Qwen2 of a preset size with the toy tokenizer; returns (dir, parameter count)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    spec = SIZES[size]
    model_dir = root / f"model_{size}_{dtype_name}"
    meta = model_dir / "bench_meta.json"
    if meta.exists():
        return str(model_dir), json.loads(meta.read_text())["params"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=max(spec["vocab"], len(tokenizer)),
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype_name))
    params = sum(p.numel() for p in model.parameters())
    from ogpsa.plugin.files import atomic_dir

    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "bench_meta.json").write_text(json.dumps({"size": size, "params": params, **spec}))
    del model
    return str(model_dir), params


# ---------------------------------------------------------------------------------------------
# instrumentation: one recorder per run; wrappers around OGPSACallback.rebuild and project_


class Recorder:
    current: Recorder | None = None

    def __init__(self, device: str, warmup: int, timed: int):
        self.device = device
        self.warmup, self.timed = warmup, timed
        self.last_end: float | None = None
        self.pending_rebuild = 0.0
        self.pending_proj: list = []  # CUDA event pairs or seconds, for the current step
        self.profile_now = False
        self.steps: list[dict] = []  # one per step: interval, rebuild, projection
        self.rebuilds: list[dict] = []  # {"step", "seconds", "phase"}
        self.callback = None  # the OGPSACallback, captured by the rebuild wrapper
        self.profile: dict | None = None
        self.extra: dict = {}
        self.in_rebuild = False
        self.train_tokens = [0, 0]  # real (attention mask) and padded positions of the training batches


def install_wrappers() -> None:
    import ogpsa.plugin.callback as cbmod
    import ogpsa.plugin.gradient_span as spanmod
    import torch

    if getattr(cbmod, "__bench_wrapped__", False):
        return
    original_rebuild = cbmod.OGPSACallback.rebuild
    original_project = spanmod.project_

    def rebuild(self, args, state, model, followup=False):
        rec = Recorder.current
        if rec is None:
            return original_rebuild(self, args, state, model, followup=followup)
        rec.callback = self
        _sync(rec.device)
        t0 = time.perf_counter()
        rec.in_rebuild = True
        try:
            original_rebuild(self, args, state, model, followup=followup)
        finally:
            rec.in_rebuild = False
        _sync(rec.device)
        dt = time.perf_counter() - t0
        phase = rec.extra.get("phase", "train")
        rec.rebuilds.append({"step": state.global_step, "seconds": dt, "phase": phase})
        if phase == "train":
            rec.pending_rebuild += dt

    def timed(fn):
        # Times one projection call in place (CUDA events, so nothing extra is synchronised); a
        # step's calls are summed: project_ and, with ogpsa_target=update, span_coordinates before
        # optimizer.step and project_change_ after it.
        def wrapper(*args):
            rec = Recorder.current
            if rec is None:
                return fn(*args)
            if rec.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args)
                end.record()
                rec.pending_proj.append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args)
                rec.pending_proj.append(time.perf_counter() - t0)
            return out

        return wrapper

    timed_project = timed(original_project)

    def project_(grads, basis, mode="project", reduce=None):
        rec = Recorder.current
        if rec is not None and rec.profile_now and reduce is None:
            rec.profile_now = False
            rec.profile = profile_projection(original_project, grads, basis, mode, rec.device)
        return timed_project(grads, basis, mode, reduce)

    cbmod.OGPSACallback.rebuild = rebuild
    _count_training_tokens()
    spanmod.project_ = project_
    spanmod.span_coordinates = timed(spanmod.span_coordinates)
    spanmod.project_change_ = timed(spanmod.project_change_)
    cbmod.__bench_wrapped__ = True


def _count_training_tokens() -> None:
    """Count the real and padded positions of every training micro-batch (the base of LLaMA-Factory's
    SFT collator and of its pairwise DPO collator, which passes it the concatenated pairs)."""
    from llamafactory.data.collator import MultiModalDataCollatorForSeq2Seq

    original = MultiModalDataCollatorForSeq2Seq.__call__

    def call(self, features):
        batch = original(self, features)
        rec = Recorder.current
        if rec is not None and not rec.in_rebuild and rec.extra.get("phase", "train") == "train":
            mask = batch.get("attention_mask")
            ids = batch["input_ids"]
            rec.train_tokens[0] += int(mask.bool().sum()) if mask is not None and mask.dim() == 2 else ids.numel()
            rec.train_tokens[1] += ids.numel()
        return batch

    MultiModalDataCollatorForSeq2Seq.__call__ = call


def profile_projection(project, grads, basis, mode, device) -> dict:
    """Run `project_` on clones of the real gradients under torch.profiler; count copies and syncs.

    Clones, so the real step's gradients are projected once, by the real call that follows.
    """
    import torch

    out: dict = {}
    present = [g for g in grads if g is not None]
    gdev = present[0].device if present else None
    tensors = list(basis.directions) + list(basis.coords) + [basis.ref_norms]
    out["basis_on_grad_device"] = bool(gdev is not None and all(t.device == gdev for t in tensors))
    out["grad_device"] = str(gdev)
    clones = [g.clone() if g is not None else None for g in grads]
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            project(clones, basis, mode)
            _sync(device)
        events = list(prof.events())
        names = [e.name for e in events]
        # a copy of anything basis- or gradient-sized would show up as a large copy_ / _to_copy input
        copies = [e for e in events if e.name in ("aten::copy_", "aten::_to_copy", "aten::to")]
        sizes = [max((math.prod(s) for s in (e.input_shapes or []) if s), default=0) for e in copies]
        out["copy_numels"] = sorted(set(sizes))
        out["large_copies"] = sum(1 for n in sizes if n > LARGE_COPY)
    except Exception as e:  # noqa: BLE001  profiler unavailable (e.g. CUPTI): fall back to the device check
        out["profiler_error"] = repr(e)
        names = None
    if names is not None:
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
    if device == "cuda":
        ok = (out["basis_on_grad_device"] and names is not None and out["memcpy_htod"] == 0
              and out["memcpy_dtoh"] <= 1 and out["large_copies"] == 0)
        out["method"] = ("torch.profiler (CPU+CUDA, record_shapes) over one project_ on clones of the real "
                         "gradients of the last step: Memcpy HtoD = 0, Memcpy DtoH <= 1 (the single .tolist()), "
                         f"no copy_/_to_copy of more than {LARGE_COPY} elements, and every basis tensor on the "
                         "gradient's device")
    else:
        ok = out["basis_on_grad_device"] and names is not None and out["large_copies"] == 0
        out["method"] = ("CPU (no host/device boundary): every basis tensor on the gradient's device, and "
                         "torch.profiler (record_shapes) over one project_ on clones of the real gradients "
                         f"shows no copy_/_to_copy of more than {LARGE_COPY} elements")
    out["ok"] = bool(ok)
    del clones
    return out


def make_timer(rec: Recorder):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _sync(rec.device)
            rec.last_end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            # the last step (after warm-up + timed) is the profiling step
            rec.profile_now = state.global_step == rec.warmup + rec.timed

        def on_step_end(self, args, state, control, **kwargs):
            _sync(rec.device)
            now = time.perf_counter()
            proj = []
            for p in rec.pending_proj:
                proj.append(p[0].elapsed_time(p[1]) / 1000.0 if isinstance(p, tuple) else p)
            rec.steps.append({
                "step": state.global_step,
                "interval_s": now - rec.last_end,
                "rebuild_s": rec.pending_rebuild,
                "projection_s": sum(proj) if proj else None,
            })
            rec.pending_rebuild, rec.pending_proj = 0.0, []
            rec.last_end = now

        def on_train_end(self, args, state, control, model=None, **kwargs):
            _sync(rec.device)
            rec.extra["peak_bytes"] = _peak_bytes(rec.device)
            cb = rec.callback
            if cb is None or getattr(cb.constraint, "basis", None) is None:
                return
            rec.extra["basis_bytes"] = cb.constraint.basis.nbytes()
            rec.extra["basis_rank"] = cb.constraint.basis.rank()
            rec.extra["basis_tensors"] = len(cb.constraint.basis.directions)
            rec.extra["basis_full_rank_tensors"] = sum(1 for d in cb.constraint.basis.directions if d.shape[0] == len(cb.refs))
            rec.extra["trainable_numel"] = sum(p.numel() for p in cb.params)
            rec.extra["largest_tensor_numel"] = max(p.numel() for p in cb.params)
            rec.extra["trainable_tensors"] = len(cb.params)
            rec.extra["basis_dtype"] = str(cb.constraint.basis.directions[0].dtype)
            rec.extra["ref_batches"] = sum(-(-len(r.features) // self._bs(cb, args)) for r in cb.refs)
            rec.extra["ref_tokens"] = sum(len(f["input_ids"]) for r in cb.refs for f in r.features)
            last = cb._last_rebuild
            rec.extra["ref_input_tokens"] = sum(v for k, v in last.items() if k.startswith("input_tokens/"))
            rec.extra["ref_padded_tokens"] = sum(v for k, v in last.items() if k.startswith("padded_tokens/"))
            raw, reb = [], []
            rec.extra["phase"] = "end"
            for _ in range(rec.extra.get("rebuild_repeats", 2)):
                raw.append(raw_forward_backward(cb, model, args, rec.device, self._bs(cb, args)))
                n = len(rec.rebuilds)
                cb.rebuild(args, state, model)
                reb.append(rec.rebuilds[n]["seconds"] if len(rec.rebuilds) > n else None)
            rec.extra["raw_s"] = raw
            rec.extra["rebuild_end_s"] = reb
            rec.extra["phase"] = "done"

        @staticmethod
        def _bs(cb, args):
            return cb.settings.ogpsa_reference_batch_size or args.per_device_train_batch_size

    return StepTimer()


def raw_forward_backward(cb, model, args, device: str, batch_size: int) -> float:
    """Forward+backward of the rebuild's reference batches, nothing else (no norms, no basis)."""
    import torch
    from ogpsa.plugin.reference import shard_batches

    params = cb.params
    dev = params[0].device
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        _sync(device)
        t0 = time.perf_counter()
        for ref in cb.refs:
            for batch, _ in shard_batches(ref, batch_size, cb.collator, dev):
                model(**batch).loss.backward()
            for p in params:
                p.grad = None
        _sync(device)
        dt = time.perf_counter() - t0
    model.train(was_training)
    return dt


# ---------------------------------------------------------------------------------------------
# one run


def run_config(opts, model_dir: str, data_dir: str, stage: str, ogpsa: bool, out_dir: Path) -> dict:
    pair = stage
    cfg = {
        "model_name_or_path": model_dir,
        "stage": stage,
        "do_train": True,
        "finetuning_type": "full",
        "dataset": "bench_sft" if stage == "sft" else "bench_dpo",
        "dataset_dir": data_dir,
        "template": "qwen",
        "cutoff_len": opts.seq_len,
        "output_dir": str(out_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": opts.batch,
        "gradient_accumulation_steps": opts.grad_accum,
        "learning_rate": 1.0e-5,
        "lr_scheduler_type": "constant",
        "max_steps": opts.warmup + opts.steps + 1,  # + 1: the profiling step, not timed
        "logging_steps": 10**6,  # no per-step logging (the callback's 'observe' pass rides on it)
        "report_to": "none",
        "save_strategy": "no",
        "seed": 42,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "log_level": "warning",
        "plot_loss": False,
    }
    if opts.device == "cuda":
        cfg["bf16"] = True
    else:
        cfg["use_cpu"] = True
    if stage == "dpo":
        cfg.update({"pref_beta": 0.1, "pref_loss": "sigmoid"})
    if ogpsa:
        cfg.update({
            "stage": f"ogpsa_{pair}",
            "ogpsa_reference": ",".join(REFS),
            "ogpsa_reference_samples": opts.ref_samples,
            "ogpsa_refresh_steps": PAPER_K[pair],
            "ogpsa_reference_batch_size": opts.batch,
            "ogpsa_target": opts.target,
        })
    return cfg


def one_run(opts, model_dir, data_dir, stage, ogpsa, out_dir) -> dict:
    import torch
    from llamafactory.train.tuner import run_exp

    cfg = run_config(opts, model_dir, data_dir, stage, ogpsa, out_dir)
    rec = Recorder(opts.device, opts.warmup, opts.steps)
    rec.extra["rebuild_repeats"] = opts.rebuild_repeats
    gc.collect()
    if opts.device == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()
    base = _current_bytes(opts.device)
    mem_method = _reset_peak(opts.device)
    Recorder.current = rec
    t0 = time.perf_counter()
    try:
        run_exp(dict(cfg), callbacks=[make_timer(rec)])
    finally:
        Recorder.current = None
    wall = time.perf_counter() - t0
    timed = [s for s in rec.steps if opts.warmup < s["step"] <= opts.warmup + opts.steps]
    step_s = [s["interval_s"] - s["rebuild_s"] for s in timed]
    incl_s = [s["interval_s"] for s in timed]
    proj_s = [s["projection_s"] for s in timed if s["projection_s"] is not None]
    result = {
        "stage": cfg["stage"],
        "wall_s": wall,
        "steps_recorded": len(rec.steps),
        "timed_steps": len(timed),
        "step_ms": [1e3 * x for x in step_s],
        "step_ms_median": 1e3 * median(step_s) if step_s else None,
        "step_incl_rebuild_ms_mean": 1e3 * statistics.fmean(incl_s) if incl_s else None,
        "peak_bytes": rec.extra.get("peak_bytes"),
        "start_bytes": base,
        "memory_method": mem_method,
        # micro-batches are drawn for every step, warm-up and profiling step included
        "train_real_tokens_per_step": rec.train_tokens[0] / max(len(rec.steps), 1),
        "train_padded_tokens_per_step": rec.train_tokens[1] / max(len(rec.steps), 1),
    }
    if ogpsa:
        result.update({
            "projection_ms": [1e3 * x for x in proj_s],
            "projection_ms_median": 1e3 * median(proj_s) if proj_s else None,
            "rebuilds": rec.rebuilds,
            "rebuild_in_timed_steps": sum(1 for s in timed if s["rebuild_s"] > 0),
            "rebuild_s_median": median(rec.extra.get("rebuild_end_s", [])),
            "raw_fwd_bwd_s_median": median(rec.extra.get("raw_s", [])),
            "rebuild_end_s": rec.extra.get("rebuild_end_s"),
            "raw_fwd_bwd_s": rec.extra.get("raw_s"),
            "profile": rec.profile,
        })
        for key in ("basis_bytes", "basis_rank", "basis_tensors", "basis_full_rank_tensors", "trainable_numel",
                    "largest_tensor_numel", "trainable_tensors", "basis_dtype", "ref_batches", "ref_tokens", "ref_input_tokens",
                    "ref_padded_tokens"):
            result[key] = rec.extra.get(key)
    rec.callback = None
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# summary and table


def summarise(raw: dict, sizes: list[str], opts) -> list[dict]:
    rows = []
    for size in sizes:
        for pair in opts.stages:
            reps = raw["runs"].get(size, {}).get(pair, [])
            if not reps:
                continue  # not run yet (partial results)
            ok = [r for r in reps if "error" not in r["plain"] and "error" not in r["ogpsa"]]
            row = {"size": size, "params": raw["params"].get(size), "stage": pair, "K": PAPER_K[pair],
                   "repeats": len(ok), "errors": [r[k]["error"] for r in reps for k in ("plain", "ogpsa")
                                                  if "error" in r[k]]}
            if not ok:
                rows.append(row)
                continue
            plain = [r["plain"]["step_ms_median"] for r in ok]
            og = [r["ogpsa"]["step_ms_median"] for r in ok]
            proj = [r["ogpsa"]["projection_ms_median"] for r in ok]
            reb = [r["ogpsa"]["rebuild_s_median"] for r in ok]
            rawfb = [r["ogpsa"]["raw_fwd_bwd_s_median"] for r in ok]
            K = PAPER_K[pair]
            row.update({
                "plain_ms": median(plain),
                "ogpsa_ms": median(og),
                "overhead_pct": median([100 * (o - p) / p for o, p in zip(og, plain)]),
                "projection_ms": median(proj),
                "projection_pct": median([100 * x / p for x, p in zip(proj, plain) if x is not None]),
                "rebuild_s": median(reb),
                "raw_fwd_bwd_s": median(rawfb),
                "rebuild_ratio": median([a / b for a, b in zip(reb, rawfb) if a and b]),
                "amortised_ms": median([o + 1e3 * b / K for o, b in zip(og, reb) if b is not None]),
                "amortised_overhead_pct": median([100 * (o + 1e3 * b / K - p) / p
                                                  for o, b, p in zip(og, reb, plain) if b is not None]),
                "measured_incl_rebuild_ms": median([r["ogpsa"]["step_incl_rebuild_ms_mean"] for r in ok]),
                "amortised_note": (f"run has {opts.steps} timed steps < K={K}: amortised = rebuild/K + step"
                                   if opts.steps < K else f"run covers K={K} steps; measured_incl_rebuild_ms "
                                   "includes the rebuilds that fell in the timed steps"),
                "peak_plain_mb": median([r["plain"]["peak_bytes"] / 2**20 for r in ok]),
                "peak_ogpsa_mb": median([r["ogpsa"]["peak_bytes"] / 2**20 for r in ok]),
                "basis_mb": ok[0]["ogpsa"]["basis_bytes"] / 2**20 if ok[0]["ogpsa"]["basis_bytes"] else None,
                "basis_bytes": ok[0]["ogpsa"]["basis_bytes"],
                "trainable_numel": ok[0]["ogpsa"]["trainable_numel"],
                "no_copy": all((r["ogpsa"]["profile"] or {}).get("ok", False) for r in ok),
            })
            row.update(_per_token(ok, reb))
            row.update(_memory_bound(row, ok[0]["ogpsa"]))
            row["pass_projection"] = row["projection_pct"] is not None and row["projection_pct"] <= TARGET_PROJ_PCT
            row["pass_rebuild"] = row["rebuild_ratio"] is not None and row["rebuild_ratio"] <= TARGET_REBUILD_RATIO
            rows.append(row)
    # flat: per stage, across sizes (in the order given, the smallest first is not assumed)
    for pair in ("sft", "dpo"):
        mine = [r for r in rows if r["stage"] == pair and r.get("projection_pct") is not None]
        if len(mine) < 2:
            verdict = None
        else:
            smallest = min(mine, key=lambda r: r["params"] or 0)
            verdict = all(r["projection_pct"] <= smallest["projection_pct"] + TARGET_FLAT_PP for r in mine)
        for r in mine:
            r["pass_flat"] = verdict
    return rows


def _memory_bound(row: dict, ogpsa: dict) -> dict:
    """OGPSA's peak against plain + basis + one float32 tensor of the largest trainable parameter."""
    largest, basis = ogpsa.get("largest_tensor_numel"), row.get("basis_bytes")
    if not largest or basis is None or row.get("peak_plain_mb") is None:
        return {"peak_bound_mb": None, "scratch_mb": None, "pass_memory": None}
    scratch = largest * SCRATCH_BYTES_PER_ELEMENT / 2**20
    bound = row["peak_plain_mb"] + basis / 2**20 + scratch
    return {"peak_bound_mb": bound, "scratch_mb": scratch, "pass_memory": row["peak_ogpsa_mb"] <= bound}


def _per_token(ok: list[dict], rebuild_s: list) -> dict:
    """What users pay per real token: a rebuild against a plain training step, and each one's padding."""
    first = ok[0]["ogpsa"]
    ref_real, ref_padded = first.get("ref_input_tokens"), first.get("ref_padded_tokens")
    train_real = median([x for r in ok if (x := r["plain"].get("train_real_tokens_per_step"))])
    train_padded = median([x for r in ok if (x := r["plain"].get("train_padded_tokens_per_step"))])
    plain_s = median([r["plain"]["step_ms_median"] / 1e3 for r in ok])
    out = {"ref_pad_ratio": ref_padded / ref_real if ref_real else None,
           "train_pad_ratio": train_padded / train_real if train_real else None,
           "plain_ms_per_ktok": 1e6 * plain_s / train_real if train_real else None}
    reb = median([b for b in rebuild_s if b])
    out["rebuild_ms_per_ktok"] = 1e6 * reb / ref_real if ref_real and reb else None
    if out["plain_ms_per_ktok"] and out["rebuild_ms_per_ktok"]:
        out["per_token_ratio"] = out["rebuild_ms_per_ktok"] / out["plain_ms_per_ktok"]
    else:
        out["per_token_ratio"] = None
    return out


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def _verdict(v):
    return "n/a" if v is None else ("PASS" if v else "MISS")


HEADER = ("| size | params | stage | plain ms/step | ogpsa ms/step (no rebuild) | overhead % | projection-only % "
          "| rebuild s | raw fwd+bwd s | rebuild/raw | amortised overhead % @K | peak mem plain/ogpsa MB | basis MB "
          "| proj <=3% | rebuild <=1.2x | no H/D copy | flat "
          "| rebuild ms/1k real tok | plain step ms/1k real tok | per-token rebuild/plain | padded/real ref, train |")


def table(rows: list[dict]) -> str:
    lines = [HEADER, "|" + "|".join(["---"] * (HEADER.count("|") - 1)) + "|"]
    for r in rows:
        if r.get("plain_ms") is None:
            lines.append(f"| {r['size']} | {_f(r['params'] and r['params'] / 1e6, '{:.1f}M')} | {r['stage']} | "
                         + " | ".join(["error"] + ["-"] * 19) + " |")
            continue
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['stage']} | {_f(r['plain_ms'])} | {_f(r['ogpsa_ms'])} "
            f"| {_f(r['overhead_pct'], '{:+.1f}')} | {_f(r['projection_pct'], '{:.2f}')} | {_f(r['rebuild_s'], '{:.2f}')} "
            f"| {_f(r['raw_fwd_bwd_s'], '{:.2f}')} | {_f(r['rebuild_ratio'], '{:.2f}')} "
            f"| {_f(r['amortised_overhead_pct'], '{:+.1f}')} (K={r['K']}) "
            f"| {_f(r['peak_plain_mb'], '{:.0f}')} / {_f(r['peak_ogpsa_mb'], '{:.0f}')} | {_f(r['basis_mb'])} "
            f"| {_verdict(r['pass_projection'])} | {_verdict(r['pass_rebuild'])} | {_verdict(r['no_copy'])} "
            f"| {_verdict(r.get('pass_flat'))} "
            f"| {_f(r.get('rebuild_ms_per_ktok'), '{:.0f}')} | {_f(r.get('plain_ms_per_ktok'), '{:.0f}')} "
            f"| {_f(r.get('per_token_ratio'), '{:.2f}')} "
            f"| {_f(r.get('ref_pad_ratio'), '{:.2f}')}, {_f(r.get('train_pad_ratio'), '{:.2f}')} |"
        )
    return "\n".join(lines)


def markdown(raw: dict, rows: list[dict]) -> str:
    s = raw["settings"]
    env = raw["environment"]
    notes = [
        (f"# OGPSA overhead benchmark ({env['device']} on {s['device']}, torch {env['torch']}, "
        f"llamafactory {env['llamafactory']}, transformers {env['transformers']})"),
        "",
        (f"Settings: batch {s['batch']} x {s.get('grad_accum', 1)} accumulation step(s), ogpsa_target {s.get('target', 'gradient')}, cutoff_len {s['seq_len']}, {s['steps']} timed steps after {s['warmup']} "
        f"warm-up, {s['repeats']} repeat(s) (medians), {s['ref_samples']} samples per reference set x {len(REFS)} sets, "
        f"full fine-tuning, AdamW, {'bf16' if s['device'] == 'cuda' else 'fp32'}, {env['threads']} thread(s)."),
        f"Memory: {raw['memory_method']}.",
        "",
        table(rows),
        "",
    ]
    for r in rows:
        if r.get("amortised_note") and "<" in r["amortised_note"]:
            notes.append(f"- amortised: {r['amortised_note']}.")
            break
    notes.append(f"- no H/D copy: {raw.get('copy_check_method', '-')}.")
    bounds = [r for r in rows if r.get("peak_bound_mb") is not None]
    if bounds:
        notes.append("- memory bound (peak OGPSA <= peak plain + basis + one float32 tensor of the largest trainable "
                     "parameter): " + "; ".join(
                         f"{r['size']} {r['stage']} {r['peak_ogpsa_mb']:.0f} <= {r['peak_plain_mb']:.0f} + "
                         f"{r['basis_mb']:.0f} + {r['scratch_mb']:.0f} = {r['peak_bound_mb']:.0f} MB "
                         f"{_verdict(r['pass_memory'])}" for r in bounds) + ".")
    notes.append(f"- reference answer lengths: {s.get('ref_lengths', 'equal')} (spread: as real GSM8K/Alpaca/HHH, "
                 "scaled to cutoff_len); per-token columns divide by real (non-padding) tokens.")
    for pair in ("sft", "dpo"):
        mine = [r for r in rows if r["stage"] == pair and r.get("projection_pct") is not None]
        if mine:
            notes.append(f"- flat ({pair}): projection % by size: "
                         + ", ".join(f"{r['size']} {r['projection_pct']:.2f}%" for r in mine)
                         + "; end-to-end overhead %: " + ", ".join(f"{r['size']} {r['overhead_pct']:+.1f}%" for r in mine)
                         + f" (PASS when no size exceeds the smallest by more than {TARGET_FLAT_PP} pp).")
    errs = [e for r in rows for e in r.get("errors", [])]
    if errs:
        notes.append(f"- errors: {len(errs)} run(s) failed; see bench.json.")
    return "\n".join(notes) + "\n"


# ---------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help=f"comma-separated presets from {list(SIZES)} (CPU default 10m,50m; "
                                                 "CUDA default 150m,500m; 500m and 1.5b are Qwen2.5-0.5B/1.5B shapes)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per size (3; --quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (CPU 4, CUDA 30; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps dropped (CPU 1, CUDA 5; quick 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="per-device batch (CPU 4, CUDA 8)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="gradient_accumulation_steps: micro-batches per optimizer step (the projection runs once "
                        "per optimizer step, so its share falls as this grows)")
    p.add_argument("--target", default="update", choices=["update", "gradient"],
                   help="ogpsa_target of the OGPSA stages (update: the default, 4 passes over the basis per "
                        "step; gradient: the paper's, 2)")
    p.add_argument("--seq-len", type=int, default=None, help="cutoff_len and the data's length (CPU 64, CUDA 1024)")
    p.add_argument("--ref-lengths", default="spread", choices=["spread", "equal"],
                   help="reference answer lengths: spread as real GSM8K/Alpaca/HHH (default) or all ~seq-len")
    p.add_argument("--ref-samples", type=int, default=None, help="samples per reference set (CPU 8, CUDA 100 as the paper)")
    p.add_argument("--rebuild-repeats", type=int, default=None, help="rebuild/raw pairs timed at the end of each OGPSA run (CPU 1, CUDA 3)")
    p.add_argument("--stages", default="sft,dpo", help="stage pairs to run: sft, dpo or both")
    p.add_argument("--out", default="runs/bench", help="output folder (bench.json, bench.md)")
    p.add_argument("--assets", default=None, help="folder for the built tokenizer, data and models (default "
                                                  "<out>/_assets; share it between runs of the same --seq-len and "
                                                  "--ref-samples to build each model once)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 2 timed steps, small data")
    opts = p.parse_args(argv)
    return opts


def resolve(opts):
    import torch

    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch.cuda.is_available() is False")
    gpu = opts.device == "cuda"
    q = opts.quick
    defaults = {
        "sizes": "10m" if q else ("150m,500m" if gpu else "10m,50m"),
        "repeats": 1 if q else 3,
        "steps": 2 if q else (30 if gpu else 4),
        "warmup": 1 if q else (5 if gpu else 1),
        "batch": 2 if q else (8 if gpu else 4),
        "seq_len": 64 if q else (1024 if gpu else 64),
        "ref_samples": 4 if q else (100 if gpu else 8),
        "rebuild_repeats": 1 if q else (3 if gpu else 1),
    }
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    opts.sizes = [s.strip().lower() for s in opts.sizes.split(",") if s.strip()]
    bad = [s for s in opts.sizes if s not in SIZES]
    if bad:
        raise SystemExit(f"bench: unknown size(s) {bad}; known: {list(SIZES)}")
    opts.stages = [s.strip() for s in opts.stages.split(",") if s.strip()]
    if not opts.stages or any(s not in PAPER_K for s in opts.stages):
        raise SystemExit("bench: --stages takes sft, dpo or sft,dpo")
    if opts.warmup < 1 or opts.steps < 1 or opts.repeats < 1 or opts.grad_accum < 1:
        raise SystemExit("bench: --warmup, --steps, --repeats and --grad-accum must be >= 1")
    return opts


def main(argv=None) -> int:
    opts = parse(argv)
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    assets = Path(opts.assets).resolve() if opts.assets else out / "_assets"
    os.environ.setdefault("HF_DATASETS_CACHE", str(assets / "hf_datasets_cache"))

    import torch
    import transformers
    from ogpsa.pipelines.integration.hook import arm

    arm()
    import llamafactory
    import llamafactory.train.tuner

    resolve(opts)
    install_wrappers()
    # The benchmark never needs the trained weights: skip the 2 x model-size write at each run's end.
    transformers.Trainer.save_model = lambda self, *a, **k: None
    transformers.logging.set_verbosity_error()
    import logging as _logging

    _logging.getLogger("llamafactory").setLevel(_logging.WARNING)

    from ogpsa.data_prep import tiny

    tiny_paths = tiny.build(assets / "tiny")
    data_dir = build_data(assets, opts.seq_len, opts.ref_samples, ref_lengths=opts.ref_lengths)
    dtype_name = "bfloat16" if opts.device == "cuda" else "float32"
    raw = {
        "settings": {k: getattr(opts, k) for k in ("sizes", "repeats", "steps", "warmup", "device", "batch", "grad_accum", "target", "seq_len",
                                                   "ref_samples", "ref_lengths", "rebuild_repeats", "stages", "quick")},
        "environment": {
            "device": device_name(opts.device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "llamafactory": getattr(llamafactory, "__version__", "?"),
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda,
            "host": platform.node(),
        },
        "paper_K": PAPER_K,
        "targets": {"projection_pct_max": TARGET_PROJ_PCT, "rebuild_ratio_max": TARGET_REBUILD_RATIO,
                    "flat_pp": TARGET_FLAT_PP,
                    "memory_bound": "peak ogpsa <= peak plain + basis + largest trainable tensor x "
                                    f"{SCRATCH_BYTES_PER_ELEMENT} bytes"},
        "memory_method": None,
        "params": {},
        "model_presets": {s: SIZES[s] for s in opts.sizes},
        "runs": {},
    }
    models = {}
    for size in opts.sizes:
        print(f"bench: building {size} model ...", flush=True)
        models[size], raw["params"][size] = build_model(assets, size, tiny_paths["model"], dtype_name)
    t_start = time.perf_counter()
    for rep in range(opts.repeats):
        for size in opts.sizes:
            for pair in opts.stages:
                entry = {}
                for ogpsa in (False, True):
                    name = f"{'ogpsa_' if ogpsa else ''}{pair}"
                    print(f"bench: repeat {rep + 1}/{opts.repeats} size {size} {name} ...", flush=True)
                    try:
                        res = one_run(opts, models[size], data_dir, pair, ogpsa, out / "_runs" / f"{size}_{name}")
                        raw["memory_method"] = res["memory_method"]
                        msg = f"  {res['step_ms_median']:.1f} ms/step"
                        if ogpsa:
                            msg += (f", projection {res['projection_ms_median']:.2f} ms, rebuild "
                                    f"{res['rebuild_s_median']:.2f} s vs raw {res['raw_fwd_bwd_s_median']:.2f} s")
                        print(msg + f" (run {res['wall_s']:.0f} s)", flush=True)
                    except Exception as e:  # noqa: BLE001  keep going: one failed run must not lose the others
                        traceback.print_exc()
                        res = {"error": f"{type(e).__name__}: {e}"}
                    entry["ogpsa" if ogpsa else "plain"] = res
                raw["runs"].setdefault(size, {}).setdefault(pair, []).append(entry)
                raw["total_s"] = time.perf_counter() - t_start
                finish(raw, opts, out, partial=True)  # a run cut short still leaves its numbers
    raw["total_s"] = time.perf_counter() - t_start
    md, rows = finish(raw, opts, out, partial=False)
    shutil.rmtree(out / "_runs", ignore_errors=True)
    print()
    print(md)
    print(f"bench: wrote {out / 'bench.json'} and {out / 'bench.md'} ({raw['total_s']:.0f} s)")
    failed = any(r.get("plain_ms") is None for r in rows)
    return 1 if failed else 0


def finish(raw: dict, opts, out: Path, partial: bool) -> tuple[str, list[dict]]:
    """Summarise what has been measured so far and write bench.json / bench.md atomically."""
    sizes = [s for s in opts.sizes if s in raw["runs"]]
    rows = summarise(raw, sizes, opts)
    raw["summary"] = rows
    profiles = [r["ogpsa"].get("profile") for s in raw["runs"].values() for p in s.values() for r in p
                if isinstance(r.get("ogpsa"), dict) and r["ogpsa"].get("profile")]
    raw["copy_check_method"] = profiles[0]["method"] if profiles else None
    raw["targets_met"] = {
        "projection_pct": all(r.get("pass_projection") for r in rows) if rows else None,
        "rebuild_ratio": all(r.get("pass_rebuild") for r in rows) if rows else None,
        "no_copy": all(r.get("no_copy") for r in rows) if rows else None,
        "memory_bound": all(r.get("pass_memory") for r in rows) if rows else None,
        "flat": (None if all(r.get("pass_flat") is None for r in rows)
                 else all(r.get("pass_flat") is not False for r in rows)),
    }
    raw["complete"] = not partial
    md = markdown(raw, rows)
    if partial:
        md = "**Partial results (the benchmark is still running or was interrupted).**\n\n" + md
    write_atomic(out / "bench.json", json.dumps(raw, indent=1, default=str) + "\n")
    write_atomic(out / "bench.md", md)
    return md, rows


if __name__ == "__main__":
    sys.exit(main())
