#!/usr/bin/env python
"""Strength knobs on the tiny model: how steady the reference losses stay, and how far the safety loss
falls, for the null space by ratio (`ogpsa_null_alpha`) and by energy (`ogpsa_null_energy`), and
for the gradient span with 1, 2 and 4 directions per reference set (`ogpsa_directions_per_set`).

    python benchmarks/strength_knobs.py --out runs/knobs       # 10 runs of the tiny model, ~12 min on 2 busy cores

Every run is stock `llamafactory-cli train` (full fine-tuning of the random tiny Qwen2 from
`data_prep/tiny.py` on `toy_safety_sft`, AdamW, the same seed), differing only in the `ogpsa_*`
keys. Losses are the mean answer-token NLL, tokenised by LLaMA-Factory as training does, of the
start and the trained model: on the reference rows the constraint protects (`ref`) and on held-out
rows of the same three sources (`held-out`); "move" is the largest |change| over the three sources.
Writes <out>/knobs.json and <out>/knobs.md (the table, also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REFS = ["toy_math_ref", "toy_general_ref", "toy_hhh_ref"]
HELD_OUT = ["toy_math_eval", "toy_general_eval", "toy_hhh_eval"]
SAFETY = "toy_safety_sft"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
       "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

RUNS = {
    "plain": {},
    "null space, alpha 5e-5 (default)": {"ogpsa_method": "null_space"},
    "null space, energy 0.9": {"ogpsa_method": "null_space", "ogpsa_null_energy": 0.9},
    "null space, energy 0.99": {"ogpsa_method": "null_space", "ogpsa_null_energy": 0.99},
    "gradient span, r = 1 (default)": {"ogpsa_method": "gradient_span"},
    "gradient span, r = 2": {"ogpsa_method": "gradient_span", "ogpsa_directions_per_set": 2},
    "gradient span, r = 4": {"ogpsa_method": "gradient_span", "ogpsa_directions_per_set": 4},
    # a rebuild every step: whether more directions help once the subspace stays current
    "gradient span, r = 1, rebuilt every step": {"ogpsa_method": "gradient_span", "ogpsa_refresh_steps": 1},
    "gradient span, r = 4, rebuilt every step": {"ogpsa_method": "gradient_span", "ogpsa_directions_per_set": 4,
                                                 "ogpsa_refresh_steps": 1},
    # the null space on every linear layer (attention too), not only the MLP (the measurement's pointer)
    "null space, energy 0.99, all linear layers": {"ogpsa_method": "null_space", "ogpsa_null_energy": 0.99,
                                                   "ogpsa_null_layers": "all_linear"},
}


def config(assets: dict, out: Path, keys: dict, steps: int, samples: int) -> dict:
    cfg = {"model_name_or_path": assets["model"], "stage": "sft", "do_train": True, "finetuning_type": "full",
           "dataset": SAFETY, "dataset_dir": assets["data"], "template": "qwen", "cutoff_len": 128,
           "output_dir": str(out), "overwrite_output_dir": True, "per_device_train_batch_size": 4,
           "learning_rate": 1e-3, "lr_scheduler_type": "constant", "optim": "adamw_torch", "max_steps": steps,
           "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 42, "dataloader_num_workers": 0}
    if keys:
        cfg.update({"stage": "ogpsa_sft", "ogpsa_reference": ",".join(REFS), "ogpsa_reference_samples": samples,
                    **keys})
    return cfg


def losses(model_dir: str, assets: dict, names: list[str], adapter: str | None = None,
           **overrides) -> dict[str, float]:
    """Mean answer-token NLL per dataset, tokenised by LLaMA-Factory with the training template (of
    `model_dir` with the LoRA adapter in `adapter` merged, when given)."""
    import torch
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
    from transformers import AutoModelForCausalLM

    from ogpsa.plugin.reference import answer_nll, tokenize_reference_sets

    probe = Path(model_dir) / "_probe"
    args = config(assets, probe, {}, 1, 1)
    args["model_name_or_path"] = model_dir
    args.update(overrides)  # e.g. the template and cutoff_len a real model trains with
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    sets = tokenize_reference_sets(names, 10_000, template, tokenizer, None, model_args, data_args, training_args)
    shutil.rmtree(probe, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    collator = SFTDataCollatorWith4DAttentionMask(template=template, model=model, label_pad_token_id=-100,
                                                  tokenizer=tokenizer)
    return {ref.name: answer_nll(model, ref, collator) for ref in sets}


def train(run_dir: Path, cfg: dict) -> float | None:
    """Write `cfg` as run_dir/config.yaml and run stock `llamafactory-cli train` on it; the seconds it
    took, or None (with the end of its stderr printed) when it failed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    proc = subprocess.run([str(Path(sys.executable).parent / "llamafactory-cli"), "train", "config.yaml"],
                          cwd=run_dir, env={**os.environ, **ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return time.time() - t0


def rebuild_summary(out: Path) -> str:
    log = out / "ogpsa_log.jsonl"
    if not log.exists():
        return ""
    event = next(json.loads(line) for line in log.read_text().splitlines() if '"rebuild"' in line)
    if event.get("method") == "null_space":
        return f"{event['input_dims'] - event['null_dims']} of {event['input_dims']} input dims protected"
    return f"rank {event['rank']}, basis {event['basis_bytes'] / 2**20:.1f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/knobs")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16, help="reference rows per set (the toy sets have 16)")
    opts = ap.parse_args(argv)
    os.environ.update(ENV)
    from ogpsa.data_prep import tiny

    out = Path(opts.out)
    assets = tiny.build(out / "_assets")
    names = REFS + HELD_OUT + [SAFETY]
    start = losses(assets["model"], assets, names)
    results = {}
    for i, (label, keys) in enumerate(RUNS.items()):
        run_dir = out / f"run{i}"
        seconds = train(run_dir, config(assets, run_dir / "model", keys, opts.steps, opts.samples))
        if seconds is None:
            return 1
        after = losses(str(run_dir / "model"), assets, names)
        change = {n: after[n] - start[n] for n in names}
        results[label] = {"keys": keys, "seconds": seconds, "change": change,
                          "ref_move": max(abs(change[n]) for n in REFS),
                          "held_out_move": max(abs(change[n]) for n in HELD_OUT),
                          "safety_change": change[SAFETY], "rebuild": rebuild_summary(run_dir / "model")}
        print(f"{label}: {results[label]['ref_move']:.4f} {results[label]['safety_change']:.4f}", flush=True)
    plain = results["plain"]
    rows = ["| run | largest reference-loss move (ref rows) | vs plain | largest move (held-out rows) | vs plain | "
            "safety-loss change | constraint |", "|---|---:|---:|---:|---:|---:|---|"]
    for label, r in results.items():
        rows.append(f"| {label} | {r['ref_move']:.4f} | {r['ref_move'] / plain['ref_move']:.3f} | "
                    f"{r['held_out_move']:.4f} | {r['held_out_move'] / plain['held_out_move']:.3f} | "
                    f"{r['safety_change']:+.4f} | {r['rebuild']} |")
    table = "\n".join(rows)
    (out / "knobs.json").write_text(json.dumps({"start": start, "steps": opts.steps, "samples": opts.samples,
                                                "runs": results}, indent=1))
    (out / "knobs.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
