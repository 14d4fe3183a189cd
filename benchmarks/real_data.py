#!/usr/bin/env python
"""The comparison on real data that can decide between settings: SmolLM2-135M-Instruct, safety SFT -> DPO,
every method against its own plain run and against averaging calibrated to plain's refusal, at 3 seeds,
with 95% intervals, through `ogpsa sweep` and `ogpsa report`.

    python benchmarks/real_data.py --data ../shared/data --out runs/real_data            # everything
    python benchmarks/real_data.py --data ../shared/data --seeds 0 --groups defaults      # one piece

It resumes: every piece is an `ogpsa sweep` call into one folder, which skips finished runs (and reuses
the starting model's evaluation and identical stages), so it can be run in pieces, across sessions.
Seeds are the outer loop: all groups at seed 0 first, so the first complete comparison comes early.
At the end one `ogpsa report` over every finished run folds the seeds and writes <out>/report.md with
intervals (plain's averaging curve at 0.25/0.5/0.75 and every run's calibrated average, `auto`), and
<out>/times.md (training seconds per run and the ratio to the plain run of the same seed).

Data (all from the folder of ../shared/data/README.md, nothing downloaded), kept disjoint:
- reference sets: 16 rows each of GSM8K train, Alpaca and BIG-bench HHH (`ogpsa data refsets`); every
  probe that is a reference prompt is excluded at evaluation (`eval.exclude`);
- capability probes: 128 held-out GSM8K test rows and 128 held-out Alpaca rows (`--eval-n 128`, drawn
  by `ogpsa data refsets` apart from the reference rows);
- safety SFT: HarmBench prompts 1-64 answered with refusals, and a benign half of 48 look-alike
  requests ("How do I kill time at an airport?") with a helpful answer, built from the demo data's
  training activities (`ogpsa.data_prep.demo`); the benign half comes from neither capability source,
  so it cannot hide their tax;
- safety DPO: 64 Do-Not-Answer "malicious uses" prompts, a refusal chosen, the base model's own greedy
  answer rejected;
- harmful probes (refusal): HarmBench prompts 65-192 (128, none in training);
- benign probes (over-refusal): the 48 look-alike requests of the demo's held-out activities (no
  activity in training) and the first 80 prompts of LLaMA-Factory's `dpo_en_demo` of at most 400
  characters (first turns; none in training, none an Alpaca row): 128.

Runs, at each seed: plain; the gradient span at its defaults and at `ogpsa_refresh_steps: 2`; the null
space at NSPO's defaults and at `ogpsa_null_energy` 0.5 and 0.9. The recipe (written to
<out>/recipe.yaml) is the quickstart's shape: SFT 2 epochs at lr 5e-5, DPO 1 epoch at lr 5e-6, batch 8.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from decay_smollm2 import REFUSALS
from strength_knobs import ENV

# Each entry is one `ogpsa sweep` call per seed: its grid (a product) over the recipe; plain is always run.
GROUPS = {
    "defaults": ["ogpsa_method=gradient_span,null_space"],
    "refresh2": ["ogpsa_refresh_steps=2"],  # the gradient span's best schedule on the quickstart's sweep
    "energy": ["ogpsa_method=null_space", "ogpsa_null_energy=0.5,0.9"],  # GPM's energy threshold instead of alpha
    # issue 35: the two constraints composed (the null space at NSPO's alpha and by energy 0.5), at the span's
    # defaults (every 5 steps, the previous rebuild's directions kept)
    "composed": ["ogpsa_method=gradient_span+null_space"],
    "composed_energy": ["ogpsa_method=gradient_span+null_space", "ogpsa_null_energy=0.5"],
    # rotation at today's reference tokens per run (a full read every 5 steps is a half every 2.5): half the
    # samples every 2 steps (1.25x today's tokens, 6 rows as today), a quarter every step (1.25x, 12 rows)
    "rotate2": ["ogpsa_reference_rotation=2", "ogpsa_refresh_steps=2"],
    "rotate4": ["ogpsa_reference_rotation=4", "ogpsa_refresh_steps=1"],
}
SEEDS = "0,1,2"
DEFAULT_GROUPS = "defaults,refresh2,energy"  # the comparison of issue 33; the others on request
N_EVAL = 128  # capability probes per source, harmful and benign probes
SAFETY = "harm_refusals"

RECIPE = """\
# Written by benchmarks/real_data.py: the real-data comparison's recipe (run by `ogpsa sweep`).
#   python benchmarks/real_data.py --data ../shared/data --out {out}
# Memory: a DPO stage of SmolLM2 reached 9.5 GB RSS (policy, reference copy, logits); the gradient span's basis
# adds 0.54 GB per row (135M params in fp32): 3.2 GB at the defaults. One run at a time on 24 GB.

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
  harmful: harm_eval
  benign: benign_eval
  max_samples: 128
  max_new_tokens: 32
  batch_size: 16
"""


def prepare(data_root: Path, out: Path) -> tuple[str, Path]:
    """(model folder, dataset_dir): SmolLM2 converted once, the real sets and probes (see the module docstring).
    Each file is written once; a rerun keeps them, so every seed and piece sees the same data."""
    bin_dir = Path(sys.executable).parent
    model = out / "smollm2"
    subprocess.run([str(bin_dir / "ogpsa"), "data", "smollm2", "--out", str(model)], check=True)
    data = out / "data"
    if not (data / "gsm8k_ref.json").exists():
        subprocess.run([str(bin_dir / "ogpsa"), "data", "refsets", "--out", str(data), "--n", "16", "--eval-n", str(N_EVAL),
                        "--hhh-n", "16", "--gsm8k", str(data_root / "gsm8k"), "--alpaca",
                        str(data_root / "alpaca" / "alpaca_en_demo.json"), "--hhh", str(data_root / "hhh_alignment"),
                        "--overwrite"], check=True)
    info = json.loads((data / "dataset_info.json").read_text())
    harmbench = [p.strip() for p in (data_root / "harmful_prompts" / "harmbench_prompts.txt").read_text().splitlines()
                 if p.strip()]
    if SAFETY not in info:
        from ogpsa.data_prep import demo

        rng = random.Random(0)
        refusals = [{"instruction": p, "input": "", "output": rng.choice(REFUSALS)} for p in harmbench[:64]]
        lookalikes = [{"instruction": ask.format(activity), "input": "", "output": demo.LOOKALIKE_ANSWER.format(activity)}
                      for activity in demo.SAFE_LOOKALIKES_TRAIN for ask in demo.HARM_ASKS]
        rows = refusals + lookalikes
        rng.shuffle(rows)
        _write(data, info, SAFETY, rows)
        held_out = [{"instruction": ask.format(activity), "input": "", "output": ""}
                    for activity in demo.SAFE_LOOKALIKES for ask in demo.HARM_ASKS]
        general = [_first_turn(row) for row in json.loads((data_root / "llamafactory_demo" / "dpo_en_demo.json").read_text())]
        # short first turns only: a prompt of a few thousand characters would dominate the batch's generation time
        short = [q for q in general if q and len(q) <= 400]
        held_out += [{"instruction": q, "input": "", "output": ""} for q in short][: N_EVAL - len(held_out)]
        _write(data, info, "benign_eval", held_out)
        _write(data, info, "harm_eval", [{"instruction": p, "input": "", "output": ""} for p in harmbench[64 : 64 + N_EVAL]])
    if "harm_dpo" not in info:
        from ogpsa.data_prep.demo import greedy_answers

        prompts = [json.loads(line)["prompt"] for line in
                   (data_root / "harmful_prompts" / "donotanswer" / "malicious_uses.jsonl").read_text().splitlines()
                   if line.strip()][:64]
        own = greedy_answers(str(model), max_new_tokens=128)(prompts)  # (text, finished): a cut answer still complies
        rows = [{"instruction": p, "input": "", "chosen": REFUSALS[i % len(REFUSALS)], "rejected": a}
                for i, (p, (a, _)) in enumerate(zip(prompts, own))]
        _write(data, info, "harm_dpo", rows, {"ranking": True, "columns": {
            "prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}})
    return str(model), data


def _first_turn(row: dict) -> str:
    turns = row.get("conversations") or []
    return turns[0]["value"].strip() if turns and turns[0].get("from") == "human" else ""


def _write(data: Path, info: dict, name: str, rows: list[dict], entry: dict | None = None) -> None:
    (data / f"{name}.json").write_text(json.dumps(rows, indent=1))
    info[name] = {"file_name": f"{name}.json", **(entry or {})}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--data", required=True, help="the folder of ../shared/data/README.md (real GSM8K, ...)")
    ap.add_argument("--out", default="runs/real_data")
    ap.add_argument("--groups", default=DEFAULT_GROUPS,
                    help=f"sweeps to run, comma-separated (default {DEFAULT_GROUPS}): {','.join(GROUPS)}")
    ap.add_argument("--seeds", default=SEEDS, help=f"seeds, comma-separated (default {SEEDS}); outer loop")
    ap.add_argument("--report-only", action="store_true", help="no training: the report over the finished runs")
    opts = ap.parse_args(argv)
    wanted = [g.strip() for g in opts.groups.split(",") if g.strip()]
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        ap.error(f"--groups: unknown group {unknown[0]!r} (known: {', '.join(GROUPS)})")
    seeds = [s.strip() for s in opts.seeds.split(",") if s.strip()]
    os.environ.update(ENV)
    out = Path(opts.out).resolve()
    model, data = prepare(Path(opts.data), out)
    recipe = out / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, data=data, out=out))
    ogpsa = str(Path(sys.executable).parent / "ogpsa")
    for seed in seeds if not opts.report_only else []:
        for name in wanted:
            grid = [a for g in GROUPS[name] for a in ("--grid", g)]
            print(f"== seed {seed}: {name}", flush=True)
            code = subprocess.run([ogpsa, "sweep", str(recipe), *grid, "--seeds", seed, "--out", str(out / "sweep"),
                                   "--average", "none"], check=False).returncode
            if code:
                return code
    runs = sorted(str(p.parent) for p in (out / "sweep").glob("*/pipeline.json") if _finished(p))
    plains = [r for r in runs if Path(r).name.startswith("plain")]
    curve = [a for r in plains for a in ("--average-run", r)]
    code = subprocess.run([ogpsa, "report", *runs, "--average", "0.25,0.5,0.75,auto", *curve, "--out", str(out / "report")],
                          check=False).returncode
    (out / "times.md").write_text(times_table(runs))
    print((out / "times.md").read_text())
    return code


def _finished(state: Path) -> bool:
    stages = json.loads(state.read_text()).get("stages") or []
    return bool(stages) and all(s.get("status") == "done" and s.get("eval") for s in stages)


def times_table(runs: list[str]) -> str:
    """Wall seconds per run (training stages, evaluations), read from each pipeline.json, and the training
    time over the plain run of the same seed; the machine's other load shows in the seconds, so the
    ratio is the number to read."""
    rows = ["| run | training s | evaluation s | training vs its plain run |", "|---|---:|---:|---:|"]
    totals = {}
    for run in runs:
        stages = json.loads((Path(run) / "pipeline.json").read_text())["stages"]
        train = sum(float(s.get("wall_seconds") or 0) for s in stages if not s.get("reused_from"))
        evals = sum(float((s.get("eval") or {}).get("runtime_s") or 0) for s in stages)
        totals[Path(run).name] = (train, evals)
    for name, (train, evals) in totals.items():
        seed = name.rsplit("__seed-", 1)[-1] if "__seed-" in name else None
        plain = totals.get(f"plain__seed-{seed}" if seed is not None else "plain", (0.0, 0.0))[0]
        ratio = f"{train / plain:.2f}x" if plain else "–"
        rows.append(f"| {name} | {train:.0f} | {evals:.0f} | {ratio} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
