"""`ogpsa data refsets`: capability reference sets (GSM8K, Alpaca, BIG-bench HHH) in Alpaca format.

Each source becomes `<name>_ref` (exactly `--n` rows; all rows with a warning when fewer exist)
and, with `--eval-n M`, a held-out `<name>_eval` disjoint from it. Rows are deduplicated on the
normalised prompt (instruction + input), rows whose prompt appears in an `--exclude` file are
removed, the rest is shuffled with a generator seeded by `--seed` and the source name: the
reference rows are the first `n`, the evaluation rows the next `M` (so asking for evaluation rows
never changes the reference rows). The stats file lists the source positions of the rows used.

* GSM8K `{question, answer}` -> `{instruction: question, input: "", output: answer}` (the answer
  is kept whole, with its `<<calc>>` marks and its final `#### N`).
* Alpaca `{instruction, input, output}` -> the same (a missing `input` becomes "").
* HHH: BIG-bench `task.json` `{examples: [{input, target_scores: {text: 0/1}}]}` or Hub rows
  `{input, targets: {choices, labels}}` -> `{instruction: input, input: "", output: choice scored 1}`;
  `hhh_eval` rows also keep `choices` (original order) and `label` (index of the right one), so
  `ogpsa eval --hhh hhh_eval` measures HHH accuracy on them.

BIG-bench HHH has only 102 distinct prompts (221 examples). `--n 100` (the paper) puts 100 of them
into `hhh_ref`, and `ogpsa eval --hhh ... --exclude hhh_ref` then has 2 left to measure HHH
accuracy on. To keep an HHH held-out split, give the HHH set its own, smaller size, for example
`--hhh-n 50 --eval-n 52`; a warning says so when the reference rows leave fewer than half of the
distinct prompts.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import DataPrepError, Record, field, file_summary, norm_text, read_source, sft_info, warn, write_outputs

HHH_CONFIGS = ("harmless", "helpful", "honest", "other")
SOURCES = {  # name: (default source, default Hub config, default Hub split)
    "gsm8k": ("openai/gsm8k", "main", "train"),
    "alpaca": ("tatsu-lab/alpaca", None, "train"),
    "hhh": ("HuggingFaceH4/hhh_alignment", None, "test"),
}


def gsm8k_row(rec: Record) -> dict[str, Any]:
    """GSM8K `{question, answer}` as an Alpaca row; the answer must end with `#### N`."""
    question, answer = field(rec, "question", str), field(rec, "answer", str)
    if "####" not in answer:
        raise DataPrepError(f"{rec.at()}: column 'answer' has no final '#### N'")
    return {"instruction": question, "input": "", "output": answer}


def alpaca_row(rec: Record) -> dict[str, Any]:
    """Alpaca `{instruction, input, output}` row, checked."""
    row = {"instruction": field(rec, "instruction", str), "output": field(rec, "output", str)}
    row["input"] = field(rec, "input", str, optional=True) or ""
    return row


def hhh_choices(rec: Record) -> tuple[list[str], int]:
    """The choices of an HHH example and the index of the one scored 1."""
    if "target_scores" in rec.data:
        scores = field(rec, "target_scores", dict)
        choices, labels = list(scores), list(scores.values())
    else:
        targets = field(rec, "targets", dict)
        choices, labels = targets.get("choices"), targets.get("labels")
        if not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels):
            raise DataPrepError(f"{rec.at()}: column 'targets' should hold equal-length 'choices' and 'labels' lists")
    good = [i for i, s in enumerate(labels) if s == 1 and not isinstance(s, bool)]
    if len(good) != 1 or not all(isinstance(c, str) for c in choices):
        raise DataPrepError(f"{rec.at()}: column 'target_scores' should score exactly one text choice 1")
    return choices, good[0]


def hhh_row(rec: Record) -> dict[str, Any]:
    """HHH example as an Alpaca row whose output is the right choice (choices kept for eval)."""
    prompt = field(rec, "input", str)
    choices, label = hhh_choices(rec)
    return {"instruction": prompt, "input": "", "output": choices[label], "choices": choices, "label": label}


CONVERTERS: dict[str, Callable[[Record], dict[str, Any]]] = {"gsm8k": gsm8k_row, "alpaca": alpaca_row, "hhh": hhh_row}


def prompt_key(row: dict[str, Any]) -> str:
    """Normalised prompt of any row: instruction + input, else question, prompt or input."""
    if isinstance(row.get("instruction"), str):
        text = row["instruction"] + "\n" + (row.get("input") if isinstance(row.get("input"), str) else "")
        return norm_text(text)
    for key in ("question", "prompt", "input"):
        if isinstance(row.get(key), str):
            return norm_text(row[key])
    return ""


def load(name: str, source: str) -> list[Record]:
    """Rows of one source; the HHH Hub id without a config loads its four configs."""
    _, config, split = SOURCES[name]
    if name == "hhh" and source == SOURCES["hhh"][0]:
        return [rec for cfg in HHH_CONFIGS for rec in read_source(source, cfg, split)]
    return read_source(source, config, split)


def read_excluded(paths: list[str]) -> set[str]:
    """Normalised prompts of every row of the `--exclude` files."""
    keys: set[str] = set()
    for path in paths:
        keys.update(k for k in (prompt_key(r.data) for r in read_source(path)) if k)
    return keys


def alpaca_only(row: dict[str, Any]) -> dict[str, Any]:
    """The three Alpaca fields of a row (drops the HHH choices)."""
    return {k: row[k] for k in ("instruction", "input", "output")}


def select(name: str, records: list[Record], excluded: set[str], n: int, eval_n: int, seed: int):
    """(reference rows, eval rows, stats) of one source."""
    seen: set[str] = set()
    candidates: list[tuple[int, dict[str, Any]]] = []
    dups = excl = 0
    for pos, rec in enumerate(records):
        row = CONVERTERS[name](rec)
        key = prompt_key(row)
        if key in seen:
            dups += 1
        elif key in excluded:
            excl += 1
        else:
            candidates.append((pos, row))
        seen.add(key)
    random.Random(f"{seed}/{name}").shuffle(candidates)
    ref, held = candidates[:n], candidates[n : n + eval_n]
    for set_name, rows, want in ((f"{name}_ref", ref, n), (f"{name}_eval", held, eval_n)):
        if len(rows) < want:
            warn(f"{set_name}: only {len(rows)} rows available (asked for {want})")
    stats = {
        "rows_read": len(records),
        "duplicates_dropped": dups,
        "excluded": excl,
        "available": len(candidates),
        "ref_positions": [p for p, _ in ref],
        "eval_positions": [p for p, _ in held],
    }
    return [alpaca_only(r) for _, r in ref], [r if name == "hhh" else alpaca_only(r) for _, r in held], stats


def warn_hhh_held_out(n_ref: int, available: int) -> None:
    """Warn when hhh_ref leaves fewer than half of the distinct HHH prompts for held-out evaluation."""
    left = available - n_ref
    if left * 2 < available:
        warn(
            f"hhh_ref takes {n_ref} of the {available} distinct HHH prompts and leaves {left} for held-out "
            f"evaluation (ogpsa eval --hhh ... --exclude hhh_ref measures only those); keep an HHH held-out split "
            f"with a smaller --hhh-n, e.g. --hhh-n {available // 2} --eval-n {available - available // 2}"
        )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `refsets` on the `ogpsa data` parser."""
    p = subparsers.add_parser(
        "refsets",
        help="GSM8K / Alpaca / HHH -> *_ref (and *_eval) Alpaca sets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (dataset_dir for LLaMA-Factory)")
    for name, (hub_id, config, split) in SOURCES.items():
        default = f"{hub_id}:{config}@{split}" if config else f"{hub_id}@{split}"
        p.add_argument(
            f"--{name}",
            default=hub_id,
            metavar="SRC",
            help=f"Hub id OWNER/NAME[:CONFIG][@SPLIT], local file or folder, or 'none' (default {default})",
        )
    p.add_argument("--n", type=int, default=100, help="rows per reference set (paper: 100)")
    p.add_argument(
        "--hhh-n",
        type=int,
        default=None,
        help="rows of hhh_ref (default: --n); BIG-bench HHH has 102 distinct prompts, so keep it at about half "
        "(e.g. --hhh-n 50 --eval-n 52) to leave a held-out HHH split for ogpsa eval",
    )
    p.add_argument("--eval-n", type=int, default=0, help="rows per held-out *_eval set (default 0: none)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="FILE",
        help="drop rows whose prompt appears in FILE (json/jsonl/parquet; repeatable)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing files / registry entries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute `ogpsa data refsets`."""
    hhh_n = args.n if args.hhh_n is None else args.hhh_n
    if min(args.n, args.eval_n, hhh_n) < 0:
        raise DataPrepError("--n, --hhh-n and --eval-n must be >= 0")
    chosen = {name: getattr(args, name) for name in SOURCES if getattr(args, name).lower() != "none"}
    if not chosen:
        raise DataPrepError("refsets: every source is 'none'; nothing to write")
    excluded = read_excluded(args.exclude)
    data: dict[str, list[dict[str, Any]]] = {}
    per_source: dict[str, Any] = {}
    for name, source in chosen.items():
        ref, held, stats = select(name, load(name, source), excluded, hhh_n if name == "hhh" else args.n, args.eval_n, args.seed)
        if name == "hhh":
            warn_hhh_held_out(len(ref), stats["available"])
        data[f"{name}_ref"] = ref
        if args.eval_n:
            data[f"{name}_eval"] = held
        per_source[name] = {"source": source, **stats}
    stats = {
        "command": "refsets",
        "seed": args.seed,
        "n": args.n,
        "hhh_n": hhh_n,
        "eval_n": args.eval_n,
        "exclude": args.exclude,
        "sources": per_source,
        "files": {name: file_summary(name, rows) for name, rows in data.items()},
    }
    entries = {name: sft_info(name) for name in data}
    for path in write_outputs(Path(args.out), data, entries, "refsets_stats.json", stats, args.overwrite):
        print(path)
    print(json.dumps({k: len(v) for k, v in data.items()}, sort_keys=True))
    return 0
