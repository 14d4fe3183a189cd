#!/usr/bin/env python
"""How fast the gradient span's protection fades between rebuilds, and what each schedule keeps.

    python benchmarks/decay.py --out runs/decay          # 10 runs of the tiny model, ~15 min on 2 cores

Every run is stock `llamafactory-cli train` of the random tiny Qwen2 from `data_prep/tiny.py` on
`toy_safety_sft` (AdamW, constant learning rate, the same seed), saving the model after each of
the steps in --at. Two settings: full fine-tuning (lr 1e-4) and LoRA on every linear layer (rank 8,
lr 2e-3). Per saved step it scores the mean answer-token NLL of the three reference sets the
constraint protects and of the safety data, and reports

    steadiness = (plain's largest reference-loss move) / (the run's largest move), from the same start

so 10x means the reference losses moved ten times less than under plain training. "built once"
(refresh 0) gives the decay curve against the number of steps since the (only) rebuild; the other
schedules show what a refresh interval and `ogpsa_keep_previous` hold at their cost, counted as the
reference input tokens the run's rebuilds read (from `ogpsa_log.jsonl`), in units of one full rebuild.
Writes <out>/decay.json and <out>/decay.md (the tables, also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from strength_knobs import ENV, REFS, SAFETY, config, losses, train

SETTINGS = {
    "full fine-tuning, lr 1e-4": {"learning_rate": 1e-4},
    "LoRA (every linear, rank 8), lr 2e-3": {"learning_rate": 2e-3, "finetuning_type": "lora", "lora_target": "all",
                                            "lora_rank": 8},
}
SCHEDULES = {
    "plain": None,
    "built once (refresh 0)": {"ogpsa_refresh_steps": 0, "ogpsa_keep_previous": False},
    "refresh 30 (the paper's SFT value, the old default)": {"ogpsa_refresh_steps": 30, "ogpsa_keep_previous": False},
    "refresh 5": {"ogpsa_refresh_steps": 5, "ogpsa_keep_previous": False},
    "refresh 5 + keep previous (the default)": {},
    "refresh 1 (every step)": {"ogpsa_refresh_steps": 1, "ogpsa_keep_previous": False},
}


def reference_cost(run_dir: Path) -> tuple[float, int, list]:
    """(input tokens the rebuilds read / one full rebuild's, rebuilds, their steps and reasons)."""
    events = [json.loads(line) for line in (run_dir / "model" / "ogpsa_log.jsonl").read_text().splitlines()]
    rebuilds = [e for e in events if e.get("event") == "rebuild"]
    tokens = [sum(v for k, v in e.items() if k.startswith("input_tokens/")) for e in rebuilds]
    return sum(tokens) / tokens[0], len(rebuilds), [(e["step"], e.get("reason", "")) for e in rebuilds]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/decay")
    ap.add_argument("--at", default="1,2,4,6,8,12,16,24", help="steps to score (the last is the run's length)")
    ap.add_argument("--settings", default=",".join(str(i) for i in range(len(SETTINGS))),
                    help="indices into the settings (0 full fine-tuning, 1 LoRA)")
    opts = ap.parse_args(argv)
    os.environ.update(ENV)
    from ogpsa.data_prep import tiny

    at = [int(x) for x in opts.at.split(",")]
    out = Path(opts.out)
    assets = tiny.build(out / "_assets")
    names = REFS + [SAFETY]
    start = losses(assets["model"], assets, names)
    chosen = [list(SETTINGS)[int(i)] for i in opts.settings.split(",")]
    results: dict = {}
    for s, setting in enumerate(chosen):
        results[setting] = {}
        for r, (label, keys) in enumerate(SCHEDULES.items()):
            run_dir = out / f"s{s}r{r}"
            cfg = config(assets, run_dir / "model", {} if keys is None else {"ogpsa_reference_samples": 16, **keys},
                         max(at), 16)
            if keys is None:
                cfg.pop("ogpsa_reference_samples", None)
            cfg.update(SETTINGS[setting])
            cfg.update({"save_strategy": "steps", "save_steps": 1, "save_only_model": True,
                        "save_total_limit": None})
            if keys is not None:
                cfg["ogpsa_save_basis"] = False
            seconds = train(run_dir, {k: v for k, v in cfg.items() if v is not None})
            if seconds is None:
                return 1
            moves, safety = {}, {}
            for step in at:
                ckpt = run_dir / "model" / f"checkpoint-{step}"
                lora = "finetuning_type" in SETTINGS[setting]
                after = losses(assets["model"] if lora else str(ckpt), assets, names,
                               adapter=str(ckpt) if lora else None)
                moves[step] = max(abs(after[n] - start[n]) for n in REFS)
                safety[step] = after[SAFETY] - start[SAFETY]
            entry = {"keys": keys, "seconds": seconds, "move": moves, "safety_change": safety}
            if keys is not None:
                entry["cost"], entry["rebuilds"], entry["rebuild_steps"] = reference_cost(run_dir)
            results[setting][label] = entry
            print(f"{setting} | {label}: move@{max(at)} {moves[max(at)]:.5f}, safety {safety[max(at)]:+.4f}",
                  flush=True)
            for step in at[:-1]:  # keep the last checkpoint only
                subprocess.run(["rm", "-rf", str(run_dir / "model" / f"checkpoint-{step}")], check=False)
    tables = []
    for setting, runs in results.items():
        plain = runs["plain"]
        head = "| schedule | " + " | ".join(f"step {t}" for t in at) + \
               f" | safety-loss change @{max(at)} (plain's share) | reference tokens read (full rebuilds) | rebuilds |"
        rows = [f"**{setting}**: steadiness (plain's largest reference-loss move / the run's) after each step", "",
                head, "|---|" + "---:|" * (len(at) + 3)]
        for label, r in runs.items():
            if label == "plain":
                cells = [f"{plain['move'][t]:.4f} (move)" for t in at]
                rows.append(f"| plain | {' | '.join(cells)} | {plain['safety_change'][max(at)]:+.4f} | 0 | 0 |")
                continue
            cells = [f"{plain['move'][t] / max(r['move'][t], 1e-12):.1f}x" for t in at]
            share = r["safety_change"][max(at)] / plain["safety_change"][max(at)]
            rows.append(f"| {label} | {' | '.join(cells)} | {r['safety_change'][max(at)]:+.4f} ({share:.0%}) | "
                        f"{r['cost']:.2f} | {r['rebuilds']} |")
        tables.append("\n".join(rows))
    text = "\n\n".join(tables)
    (out / "decay.json").write_text(json.dumps({"start": start, "at": at, "runs": results}, indent=1))
    (out / "decay.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
