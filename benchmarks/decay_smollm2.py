#!/usr/bin/env python
"""The gradient span's schedules on a real model and real data: SmolLM2-135M-Instruct, full fine-tuning.

    python benchmarks/decay_smollm2.py --data ../shared/data --out runs/decay_smollm2   # ~30 min on 2 cores

Reference sets: the first 16 rows each of real GSM8K (train), Alpaca and BIG-bench HHH, and held-out
rows of GSM8K (test) and Alpaca (`ogpsa data refsets --n 16 --eval-n 32`). Safety SFT: 64 real
HarmBench prompts, each answered with a refusal, 16 AdamW steps (lr 2e-5, batch 4), stock
`llamafactory-cli train` with the model saved after steps 4, 8 and 16. Per saved step: the largest
move of the three reference sets' mean answer NLL (steadiness = plain's / the run's), the held-out
NLL rise per source ("tax avoided" = 1 - rise / plain's rise), the safety NLL change, and the
reference input tokens the rebuilds read, in full rebuilds. Writes <out>/decay.json and <out>/decay.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from decay import reference_cost
from strength_knobs import ENV, losses, train

REFS = ["gsm8k_ref", "alpaca_ref", "hhh_ref"]
HELD_OUT = ["gsm8k_eval", "alpaca_eval"]
SAFETY = "harm_refusals"
REFUSALS = ["I can't help with that.", "I'm sorry, but I can't assist with that request.",
            "I won't help with this: it could cause serious harm.", "Sorry, I can't provide that."]
SCORE = {"template": "qwen", "default_system": "", "cutoff_len": 384}
SCHEDULES = {
    "plain": None,
    "refresh 30 (the paper's SFT value, the old default)": {"ogpsa_refresh_steps": 30, "ogpsa_keep_previous": False},
    "refresh 5": {"ogpsa_refresh_steps": 5, "ogpsa_keep_previous": False},
    "refresh 5 + keep previous (the default)": {},
}


def prepare(data_root: Path, out: Path) -> tuple[str, Path]:
    """(model folder, dataset_dir): SmolLM2 converted once, the real sets, and the safety SFT set."""
    bin_dir = Path(sys.executable).parent
    model = out / "smollm2"
    subprocess.run([str(bin_dir / "ogpsa"), "data", "smollm2", "--out", str(model)], check=True)
    data = out / "data"
    if not (data / "gsm8k_ref.json").exists():
        subprocess.run([str(bin_dir / "ogpsa"), "data", "refsets", "--out", str(data), "--n", "16", "--eval-n", "32",
                        "--hhh-n", "16", "--gsm8k", str(data_root / "gsm8k"), "--alpaca",
                        str(data_root / "alpaca" / "alpaca_en_demo.json"), "--hhh", str(data_root / "hhh_alignment"),
                        "--overwrite"], check=True)
    prompts = [p.strip() for p in (data_root / "harmful_prompts" / "harmbench_prompts.txt").read_text().splitlines()
               if p.strip()]
    rng = random.Random(0)
    rows = [{"instruction": p, "input": "", "output": rng.choice(REFUSALS)} for p in prompts[:64]]
    (data / f"{SAFETY}.json").write_text(json.dumps(rows, indent=1))
    info = json.loads((data / "dataset_info.json").read_text())
    info[SAFETY] = {"file_name": f"{SAFETY}.json"}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return str(model), data


def config(model: str, data: Path, out: Path, keys, steps: int, save_at: list[int]) -> dict:
    cfg = {"model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "full",
           "dataset": SAFETY, "dataset_dir": str(data), **SCORE, "output_dir": str(out),
           "overwrite_output_dir": True, "per_device_train_batch_size": 4, "learning_rate": 2e-5,
           "lr_scheduler_type": "constant", "optim": "adamw_torch", "max_steps": steps, "logging_steps": 1,
           "report_to": "none", "save_strategy": "steps", "save_steps": min(save_at), "save_only_model": True,
           "seed": 42, "dataloader_num_workers": 0, "disable_gradient_checkpointing": True}
    if keys is not None:
        cfg.update({"stage": "ogpsa_sft", "ogpsa_reference": ",".join(REFS), "ogpsa_reference_samples": 16,
                    "ogpsa_reference_batch_size": 8, "ogpsa_save_basis": False, **keys})
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the folder of ../shared/data/README.md (real GSM8K, ...)")
    ap.add_argument("--out", default="runs/decay_smollm2")
    ap.add_argument("--at", default="4,8,16", help="steps to score, multiples of the first (the last is the length)")
    opts = ap.parse_args(argv)
    os.environ.update(ENV)
    at = [int(x) for x in opts.at.split(",")]
    out = Path(opts.out)
    model, data = prepare(Path(opts.data), out)
    assets = {"model": model, "data": str(data)}
    names = REFS + HELD_OUT + [SAFETY]
    start = losses(model, assets, names, **SCORE)
    results = {}
    for r, (label, keys) in enumerate(SCHEDULES.items()):
        run_dir = out / f"r{r}"
        seconds = train(run_dir, config(model, data, run_dir / "model", keys, max(at), at))
        if seconds is None:
            return 1
        entry = {"keys": keys, "seconds": seconds, "steps": {}}
        for step in at:
            ckpt = run_dir / "model" / f"checkpoint-{step}"
            after = losses(str(ckpt), assets, names, **SCORE)
            entry["steps"][step] = {n: after[n] - start[n] for n in names}
            shutil.rmtree(ckpt, ignore_errors=True)
        if keys is not None:
            entry["cost"], entry["rebuilds"], entry["rebuild_steps"] = reference_cost(run_dir)
        results[label] = entry
        print(f"{label}: {seconds:.0f} s, {json.dumps(entry['steps'][max(at)])}", flush=True)
    plain = results["plain"]
    rows = ["| schedule | " + " | ".join(f"steadiness @{t}" for t in at) + " | " +
            " | ".join(f"tax avoided @{max(at)}, {n}" for n in HELD_OUT) +
            f" | safety NLL change @{max(at)} | reference tokens read (full rebuilds) | time vs plain |",
            "|---|" + "---:|" * (len(at) + len(HELD_OUT) + 3)]

    def move(entry, t):
        return max(abs(entry["steps"][t][n]) for n in REFS)

    for label, e in results.items():
        steady = [f"{move(plain, t):.4f} (move)" if e is plain else f"{move(plain, t) / max(move(e, t), 1e-12):.1f}x"
                  for t in at]
        tax = [f"+{plain['steps'][max(at)][n]:.3f} (rise)" if e is plain else
               f"{1 - e['steps'][max(at)][n] / plain['steps'][max(at)][n]:.0%}" for n in HELD_OUT]
        rows.append(f"| {label} | {' | '.join(steady)} | {' | '.join(tax)} | {e['steps'][max(at)][SAFETY]:+.3f} | "
                    f"{e.get('cost', 0):.2f} | {e['seconds'] / plain['seconds']:.2f}x |")
    table = "\n".join(rows)
    (out / "decay.json").write_text(json.dumps({"start": start, "at": at, "runs": results}, indent=1))
    (out / "decay.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
