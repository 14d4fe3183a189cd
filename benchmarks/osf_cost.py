#!/usr/bin/env python
"""`python benchmarks/osf_cost.py [--size 10m] [--steps 12] [--out runs/osf_cost]`: what PEFT's OSF
(`ogpsa_method: osf`) costs against plain full fine-tuning, on one random-initialised Qwen2 and the
benchmark's data (`ogpsa_bench/assets.py`, nothing downloaded).

Each run is its own process (`llamafactory-cli train`'s `run_exp`, the ogpsa hook armed), so its peak
resident memory is its own: plain `sft`, then `ogpsa_sft` with `ogpsa_method: osf` at the default
`ogpsa_target: update` (the step re-projected) and at `gradient` (PEFT alone). Steps are timed by a
trainer callback (the median interval between step ends after the first two steps). CPU unless
`--device cuda` (then peak allocated CUDA memory, bf16). Writes `<out>/osf_cost.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ogpsa_bench.assets import TRAIN_SETS, build_data, build_model, build_tokenizer  # noqa: E402

# One run, in a fresh interpreter: times its steps and reports peak memory as JSON on its last line.
CHILD = r"""
import json, resource, statistics, sys, time
from transformers import TrainerCallback
from ogpsa.pipelines.integration.hook import arm
arm()
from llamafactory.train.tuner import run_exp
import torch

class Steps(TrainerCallback):
    def __init__(self):
        self.ends = []
    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

cfg = json.loads(sys.argv[1])
steps = Steps()
run_exp(cfg, callbacks=[steps])
gaps = [b - a for a, b in zip(steps.ends[2:], steps.ends[3:])]
peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() and cfg.get("bf16")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({"step_s": statistics.median(gaps), "peak_bytes": peak}))
"""


def config(model: str, data: str, out: Path, opts, **extra) -> dict:
    cfg = {
        "model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": TRAIN_SETS["sft"], "dataset_dir": data, "template": "qwen", "cutoff_len": opts.seq_len,
        "output_dir": str(out), "overwrite_output_dir": True, "per_device_train_batch_size": opts.batch,
        "learning_rate": 1e-5, "lr_scheduler_type": "constant", "max_steps": opts.steps, "logging_steps": 10**6,
        "report_to": "none", "save_strategy": "no", "seed": 42, "dataloader_num_workers": 0, "disable_tqdm": True,
        "log_level": "warning", "plot_loss": False, "optim": "adamw_torch",
    }
    cfg.update({"bf16": True} if opts.device == "cuda" else {"use_cpu": True})
    cfg.update(extra)
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="10m", help="ogpsa_bench size preset (2m, 10m, 50m, 150m, 500m, 1.5b)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="runs/osf_cost")
    opts = p.parse_args()
    root = Path(opts.out).resolve()
    tok = build_tokenizer(root / "_assets")
    data = build_data(root / "_assets", opts.seq_len, ref_samples=8)
    model, params = build_model(root / "_assets", opts.size, tok["model"],
                                "bfloat16" if opts.device == "cuda" else "float32")
    runs = {
        "plain sft": config(model, data, root / "plain", opts),
        "osf (update)": config(model, data, root / "osf", opts, stage="ogpsa_sft", ogpsa_method="osf"),
        "osf (gradient, PEFT alone)": config(model, data, root / "osf_g", opts, stage="ogpsa_sft",
                                             ogpsa_method="osf", ogpsa_target="gradient"),
    }
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true"}
    results = {}
    for name, cfg in runs.items():
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["plain sft"]
    lines = [f"{opts.size} ({params / 1e6:.1f}M parameters), {opts.device}, batch {opts.batch} x {opts.seq_len} tokens, "
             f"{opts.steps} steps (median step after the first two)", "",
             "| run | s / step | x plain | peak memory (MiB) | x plain |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f} |")
    print("\n".join(lines))
    (root / "osf_cost.json").write_text(json.dumps({"size": opts.size, "params": params, "options": vars(opts),
                                                    "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
