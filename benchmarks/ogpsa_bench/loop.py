"""The runs. For each repeat, size and stage pair: the plain stage, then the OGPSA stage with each
method, on the same model and data, in this process through LLaMA-Factory's own `run_exp`. The record
is summarised and written after every run, so a run cut short keeps what it measured."""

from __future__ import annotations

import gc
import shutil
import statistics
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from ogpsa.plugin.callback import OGPSACallback
from ogpsa.plugin.constraint import make
from ogpsa.plugin.preflight import preflight
from ogpsa.plugin.settings import DEFAULT_REFRESH

from . import summary
from .assets import REFS, SIZES, TRAIN_SETS
from .device import current_bytes, environment, malloc_trim, reset_peak
from .instrument import Recorder, StepTimer, TimedConstraint
from .summary import median

# ogpsa_refresh_steps per method: the gradient span at the package's default K (what a user gets,
# written out so the summary can amortise by it); other methods keep their own default (null_space:
# 0, built once at the start). The composition rebuilds its span on the span's schedule (its null spaces
# once, at the start: the timed rebuilds are the span's)
DEFAULT_K = {pair: DEFAULT_REFRESH[f"ogpsa_{pair}"] for pair in ("sft", "dpo")}
REFRESHED = {"gradient_span", "gradient_span+null_space"}


def refresh_steps(method: str, pair: str) -> int | None:
    return DEFAULT_K[pair] if method in REFRESHED else None


def run_config(opts, model_dir: str, data_dir: str, pair: str, method: str | None, out_dir: Path) -> dict:
    """The LLaMA-Factory arguments of one run: the plain stage `pair` (method None) or its OGPSA stage."""
    cfg = {
        "model_name_or_path": model_dir,
        "stage": pair,
        "do_train": True,
        "finetuning_type": "full",
        "dataset": TRAIN_SETS[pair],
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
    if pair == "dpo":
        cfg.update({"pref_beta": 0.1, "pref_loss": "sigmoid"})
    if method is not None:
        cfg.update({
            "stage": f"ogpsa_{pair}",
            "ogpsa_method": method,
            "ogpsa_reference": ",".join(REFS),
            "ogpsa_reference_samples": opts.ref_samples,
            "ogpsa_reference_batch_size": opts.batch,
            "ogpsa_target": opts.target,
        })
        if refresh_steps(method, pair) is not None:
            cfg["ogpsa_refresh_steps"] = refresh_steps(method, pair)
    return cfg


def train(cfg: dict, recorder: Recorder, callbacks: tuple = ()) -> OGPSACallback | None:
    """Train as `cfg` says, timed into `recorder`; returns the OGPSA callback (None for a plain stage).

    An OGPSA stage gets what the stage integration would give it (`ogpsa.pipelines.integration.tuner`:
    an `OGPSACallback` bound to LLaMA-Factory's parsed arguments, last among the callbacks), except
    that the callback drives a `TimedConstraint` around the method's constraint. `callbacks` go first."""
    from llamafactory.hparams import get_train_args
    from llamafactory.train.tuner import run_exp

    settings, stock = preflight(dict(cfg))
    if settings is None:
        run_exp(dict(cfg), callbacks=[*callbacks, StepTimer(recorder)])
        return None
    callback = OGPSACallback(settings, constraint=TimedConstraint(make(settings), recorder))
    callback.bind(*get_train_args(dict(stock)))
    run_exp(dict(stock), callbacks=[*callbacks, StepTimer(recorder, callback), callback])
    return callback


@contextmanager
def _no_final_save():
    """The benchmark never needs the trained weights: skip the model write at each run's end (2 x the
    model's size per stage pair), outside the timed steps, restored after the run."""
    import transformers

    with mock.patch.object(transformers.Trainer, "save_model", lambda self, *a, **k: None):
        yield


def one_run(opts, model_dir: str, data_dir: str, pair: str, method: str | None, out_dir: Path) -> dict:
    """Train one stage (plain: method None) and reduce what it measured to medians."""
    import torch

    cfg = run_config(opts, model_dir, data_dir, pair, method, out_dir)
    rec = Recorder(opts.device, opts.warmup, opts.steps, opts.rebuild_repeats)
    gc.collect()
    if opts.device == "cuda":
        torch.cuda.empty_cache()
    else:
        malloc_trim()
    base = current_bytes(opts.device)
    mem_method = reset_peak(opts.device)
    t0 = time.perf_counter()
    with _no_final_save():
        train(cfg, rec)
    wall = time.perf_counter() - t0
    timed = [s for s in rec.steps if opts.warmup < s["step"] <= opts.warmup + opts.steps]
    step_s = [s["interval_s"] - s["rebuild_s"] for s in timed]
    incl_s = [s["interval_s"] for s in timed]
    proj_s = [s["projection_s"] for s in timed if s["projection_s"] is not None]
    real, padded = rec.train_tokens()
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
        "train_real_tokens_per_step": real / max(len(rec.steps), 1),
        "train_padded_tokens_per_step": padded / max(len(rec.steps), 1),
    }
    if method is not None:
        result.update({
            "method": method,
            "refresh_steps": refresh_steps(method, pair) or 0,
            "projection_ms": [1e3 * x for x in proj_s],
            "projection_ms_median": 1e3 * median(proj_s) if proj_s else None,
            "project_grad_ms": [1e3 * s["project_grad_s"] for s in timed if s["project_grad_s"] is not None],
            "project_step_ms": [1e3 * s["project_step_s"] for s in timed if s["project_step_s"] is not None],
            "rebuilds": rec.builds,
            "rebuild_in_timed_steps": sum(1 for s in timed if s["rebuild_s"] > 0),
            "rebuild_s_median": median(rec.extra.get("rebuild_end_s", [])),
            "raw_fwd_bwd_s_median": median(rec.extra.get("raw_s", [])),
            "rebuild_end_s": rec.extra.get("rebuild_end_s"),
            "raw_fwd_bwd_s": rec.extra.get("raw_s"),
            "profile": rec.profile,
            "profile_step": rec.profile_step,
        })
        for key in ("raw_pass", "basis_bytes", "state_bytes", "state_dtypes", "build", "trainable_numel",
                    "largest_tensor_numel", "trainable_tensors", "ref_batches", "ref_tokens", "ref_input_tokens",
                    "ref_padded_tokens"):
            result[key] = rec.extra.get(key)
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _progress(result: dict, method: str | None) -> str:
    msg = f"  {result['step_ms_median']:.1f} ms/step"
    if method is not None:
        msg += (f", projection {result['projection_ms_median']:.2f} ms, rebuild "
                f"{result['rebuild_s_median']:.2f} s vs raw {result['raw_fwd_bwd_s_median']:.2f} s")
    return msg + f" (run {result['wall_s']:.0f} s)"


def run(opts, models: dict[str, str], params: dict[str, int], data_dir: str, out: Path) -> tuple[dict, list[dict], str]:
    """Every run the options ask for; returns (the raw record, the summary rows, the markdown)."""
    raw = {
        "settings": {k: getattr(opts, k) for k in ("sizes", "repeats", "steps", "warmup", "device", "batch", "grad_accum",
                                                   "target", "methods", "seq_len", "ref_samples", "ref_lengths",
                                                   "rebuild_repeats", "stages", "quick")},
        "environment": environment(opts.device),
        "default_K": DEFAULT_K,
        "refresh_steps": {m: {p: refresh_steps(m, p) or 0 for p in opts.stages} for m in opts.methods},
        "targets": summary.targets(),
        "memory_method": None,
        "params": dict(params),
        "model_presets": {s: SIZES[s] for s in opts.sizes},
        "runs": {},
    }
    raw["settings"]["reference_sets"] = list(REFS)
    t_start = time.perf_counter()
    for rep in range(opts.repeats):
        for size in opts.sizes:
            for pair in opts.stages:
                entry: dict = {}
                raw["runs"].setdefault(size, {}).setdefault(pair, []).append(entry)
                for method in (None, *opts.methods):
                    name = pair if method is None else f"ogpsa_{pair} {method}"
                    print(f"bench: repeat {rep + 1}/{opts.repeats} size {size} {name} ...", flush=True)
                    folder = out / "_runs" / f"{size}_{pair}_{method or 'plain'}"
                    try:
                        res = one_run(opts, models[size], data_dir, pair, method, folder)
                        raw["memory_method"] = res["memory_method"]
                        print(_progress(res, method), flush=True)
                    except Exception as e:  # noqa: BLE001  keep going: one failed run must not lose the others
                        traceback.print_exc()
                        res = {"error": f"{type(e).__name__}: {e}"}
                    entry[method or "plain"] = res
                    raw["total_s"] = time.perf_counter() - t_start
                    if method is not None:
                        summary.write(raw, out, partial=True)  # a run cut short still leaves its numbers
    raw["total_s"] = time.perf_counter() - t_start
    md, rows = summary.write(raw, out, partial=False)
    shutil.rmtree(out / "_runs", ignore_errors=True)
    return raw, rows, md
