#!/usr/bin/env python
"""The comparison on real data: SmolLM2-135M-Instruct, safety SFT -> DPO, every method against plain and
weight averaging, through `ogpsa sweep`.

    python benchmarks/real_data.py --data ../shared/data --out runs/real_data

On 2 CPU cores the `defaults` and `energy` groups took about an hour with their evaluations (docs/results.md);
the `span4` group adds 12 rebuilds of about 2.5 min each; `refresh2` took 16 min alone with both cores
(12 rebuilds of about 1 min) plus its evaluations.

Data (all from the folder of ../shared/data/README.md, nothing downloaded):
- reference sets: 16 rows each of real GSM8K (train), Alpaca and BIG-bench HHH, and held-out GSM8K
  (test) and Alpaca rows for the capability NLL (`ogpsa data refsets --n 16 --eval-n 32 --hhh-n 16`);
- safety SFT: the first 64 HarmBench prompts, each answered with a refusal (no benign half, as in the
  issue that first measured this, so plain's over-refusal saturates);
- safety DPO: 64 Do-Not-Answer "malicious uses" prompts, the refusal chosen and the base model's own
  greedy answer rejected;
- held-out probes: refusal on HarmBench prompts 65-96, over-refusal on the held-out Alpaca prompts.

The recipe (written to <out>/recipe.yaml, printed at the top of its file) is the quickstart's shape:
SFT 2 epochs at lr 5e-5, DPO 1 epoch at lr 5e-6, batch 8. Each group of runs is one `ogpsa sweep`
call into the same folder (plain and the starting model's evaluation are shared, finished runs are
skipped on a rerun), then one `ogpsa report` over every run with plain's averaging curve. Writes
<out>/report.md, <out>/report.png and <out>/times.md (seconds per run, from each pipeline.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from decay_smollm2 import REFUSALS, prepare
from strength_knobs import ENV

# Each entry is one `ogpsa sweep` call: its grid (a product) over the recipe; plain is always run.
GROUPS = {
    "defaults": ["ogpsa_method=gradient_span,null_space"],
    # 4 directions per set, rebuilt every 2 steps, without the previous rebuild's: 12 basis rows per parameter
    # (6.5 GB for SmolLM2 in fp32; keeping the previous ones too would double it and ran out of memory here)
    "span4": ["ogpsa_directions_per_set=4", "ogpsa_refresh_steps=2", "ogpsa_keep_previous=false"],
    "energy": ["ogpsa_method=null_space", "ogpsa_null_energy=0.9"],      # GPM's energy threshold instead of alpha
    "refresh2": ["ogpsa_refresh_steps=2"],  # the gradient span's best schedule on the quickstart's sweep
    # issue 35: the two constraints composed (the null space at NSPO's alpha and by energy 0.5), at the span's
    # defaults (every 5 steps, the previous rebuild's directions kept)
    "composed": ["ogpsa_method=gradient_span+null_space"],
    "composed_energy": ["ogpsa_method=gradient_span+null_space", "ogpsa_null_energy=0.5"],
    # rotation at today's reference tokens per run (a full read every 5 steps is a half every 2.5): half the
    # samples every 2 steps (1.25x today's tokens, 6 rows as today), a quarter every step (1.25x, 12 rows)
    "rotate2": ["ogpsa_reference_rotation=2", "ogpsa_refresh_steps=2"],
    "rotate4": ["ogpsa_reference_rotation=4", "ogpsa_refresh_steps=1"],
}

RECIPE = """\
# Written by benchmarks/real_data.py: the real-data comparison's recipe (run by `ogpsa sweep`).
#   python benchmarks/real_data.py --data ../shared/data --out {out}
# Memory: a DPO stage of SmolLM2 reached 9.5 GB RSS (policy, reference copy, logits); the gradient span's basis
# adds 0.54 GB per row (135M params in fp32): 3.2 GB at the defaults, 6.5 GB for span4. One run at a time on 24 GB.

### model
model_name_or_path: {model}
template: qwen
default_system: ""

### method
finetuning_type: full
cutoff_len: 384

### OGPSA (reaches only ogpsa_* stages)
ogpsa_reference: gsm8k_ref,alpaca_ref,hhh_ref
ogpsa_reference_samples: 16
ogpsa_reference_batch_size: 8

### data
dataset_dir: {data}
preprocessing_num_workers: 1

### output
output_dir: {out}/run
logging_steps: 2
save_steps: 1000
report_to: none

### train
per_device_train_batch_size: 8
learning_rate: 2.0e-5
lr_scheduler_type: cosine
warmup_ratio: 0.1
disable_gradient_checkpointing: true
seed: 42

stages:
  - name: sft
    stage: ogpsa_sft
    dataset: harm_refusals
    num_train_epochs: 2
    learning_rate: 5.0e-5
  - name: dpo
    stage: ogpsa_dpo
    dataset: harm_dpo
    num_train_epochs: 1
    learning_rate: 5.0e-6
    pref_beta: 0.1

### evaluation
eval:
  dataset_dir: {data}
  template: qwen
  system: ""
  capability: [gsm8k=gsm8k_eval, alpaca=alpaca_eval]
  exclude: [gsm8k_ref, alpaca_ref, hhh_ref]
  harmful: {data}/harm_eval.json
  benign: alpaca_eval
  max_samples: 32
  max_new_tokens: 32
  batch_size: 16
"""


def add_dpo_and_probes(data_root: Path, model: str, data: Path) -> None:
    """harm_dpo (Do-Not-Answer, the model's own answer rejected) and harm_eval (held-out HarmBench)."""
    info = json.loads((data / "dataset_info.json").read_text())
    if "harm_dpo" not in info:
        from ogpsa.data_prep.demo import greedy_answers

        prompts = [json.loads(line)["prompt"] for line in
                   (data_root / "harmful_prompts" / "donotanswer" / "malicious_uses.jsonl").read_text().splitlines()
                   if line.strip()][:64]
        own = greedy_answers(model, max_new_tokens=128)(prompts)  # (text, finished): a cut answer still complies
        rows = [{"instruction": p, "input": "", "chosen": REFUSALS[i % len(REFUSALS)], "rejected": a}
                for i, (p, (a, _)) in enumerate(zip(prompts, own))]
        (data / "harm_dpo.json").write_text(json.dumps(rows, indent=1))
        info["harm_dpo"] = {"file_name": "harm_dpo.json", "ranking": True,
                            "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                        "rejected": "rejected"}}
    harmbench = [p.strip() for p in (data_root / "harmful_prompts" / "harmbench_prompts.txt").read_text().splitlines()
                 if p.strip()]
    (data / "harm_eval.json").write_text(json.dumps([{"instruction": p, "input": "", "output": ""}
                                                     for p in harmbench[64:96]], indent=1))
    (data / "dataset_info.json").write_text(json.dumps(info, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the folder of ../shared/data/README.md (real GSM8K, ...)")
    ap.add_argument("--out", default="runs/real_data")
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"sweeps to run, comma-separated: {','.join(GROUPS)}")
    opts = ap.parse_args(argv)
    os.environ.update(ENV)
    out = Path(opts.out).resolve()
    model, data = prepare(Path(opts.data), out)
    add_dpo_and_probes(Path(opts.data), model, data)
    recipe = out / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, data=data, out=out))
    ogpsa = str(Path(sys.executable).parent / "ogpsa")
    wanted = [g.strip() for g in opts.groups.split(",") if g.strip()]
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        ap.error(f"--groups: unknown group {unknown[0]!r} (known: {', '.join(GROUPS)})")
    for name in wanted:
        grid = [a for g in GROUPS[name] for a in ("--grid", g)]
        print(f"== {name}", flush=True)
        code = subprocess.run([ogpsa, "sweep", str(recipe), *grid, "--out", str(out / "sweep"),
                               "--average", "none"], check=False).returncode
        if code:
            return code
    runs = sorted(str(p.parent) for p in (out / "sweep").glob("*/pipeline.json"))
    plain = str(out / "sweep" / "plain")
    code = subprocess.run([ogpsa, "report", *runs, "--plain", plain, "--average", "0.25,0.5,0.75",
                           "--average-run", plain, "--out", str(out / "report")], check=False).returncode
    (out / "times.md").write_text(times_table(runs))
    print((out / "times.md").read_text())
    return code


def times_table(runs: list[str]) -> str:
    """Wall seconds per run (training stages, evaluations), read from each pipeline.json; the machine's
    other load shows in them, so the ratio to plain is the number to read."""
    rows = ["| run | training s | evaluation s | training vs plain |", "|---|---:|---:|---:|"]
    totals = {}
    for run in runs:
        stages = json.loads((Path(run) / "pipeline.json").read_text())["stages"]
        train = sum(float(s.get("wall_seconds") or 0) for s in stages)
        evals = sum(float((s.get("eval") or {}).get("runtime_s") or 0) for s in stages)
        totals[Path(run).name] = (train, evals)
    base = totals.get("plain", (0.0, 0.0))[0] or 1.0
    for name, (train, evals) in totals.items():
        rows.append(f"| {name} | {train:.0f} | {evals:.0f} | {train / base:.2f}x |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
