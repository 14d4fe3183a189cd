"""`ogpsa data saferlhf`: PKU-SafeRLHF -> safety SFT, safety DPO and a held-out harmful-prompt set.

Rows are grouped by prompt (whitespace/case normalised), so duplicate prompts collapse to one. A
prompt is *harmful* when any of its responses is labelled unsafe; the others are skipped.

* target (SFT output and DPO chosen), `--sft-target safe` (the default): a response labelled safe,
  taken from the first row of the prompt that pairs a safe with an unsafe response (else the first
  row with a safe one); when both responses of that row are safe, `better_response_id` picks.
  Without one, the refusal for the prompt from `--refusals` (jsonl `{prompt, refusal}`) is used;
  without that, the prompt is dropped and counted.
* `--sft-target refusal` (the paper's recipe, with its generated refusals): the refusal from
  `--refusals` for every prompt, safe responses or not; prompts without one are dropped and
  counted (`dropped_no_refusal`).
* rejected (DPO): the unsafe response with the highest `*_severity_level`; on a tie, or when
  severity is absent (older schema), the one that is not `safer_response_id`; then the first row.
* splits: harmful prompts are shuffled with `--seed`; the first `--eval-size` form `saferlhf_eval`
  (disjoint from training); SFT and DPO both take the next prompts that have a target, from the
  same pool, so with equal sizes they hold the same prompts (as in the paper); `--disjoint-sft-dpo`
  gives DPO the prompts after the SFT ones instead.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from .common import (
    DataPrepError,
    Record,
    field,
    file_summary,
    norm_text,
    ranking_info,
    read_local,
    read_source,
    sft_info,
    warn,
    write_outputs,
)

DEFAULT_SOURCE = "PKU-Alignment/PKU-SafeRLHF"
NAMES = ("saferlhf_sft", "saferlhf_dpo", "saferlhf_eval")


@dataclass(frozen=True)
class Response:
    """One labelled response of a SafeRLHF row."""

    text: str
    safe: bool
    severity: int | None
    is_safer: bool
    is_better: bool
    categories: tuple[str, ...]


@dataclass
class Prompt:
    """All rows of one (normalised) prompt."""

    text: str
    rows: list[tuple[Response, Response]] = dc_field(default_factory=list)


def parse_row(rec: Record) -> tuple[str, tuple[Response, Response]]:
    """Check one row's columns (current or older schema) and return its prompt and two responses."""
    prompt = field(rec, "prompt", str)
    better = field(rec, "better_response_id", int)
    safer = field(rec, "safer_response_id", int)
    for key, value in (("better_response_id", better), ("safer_response_id", safer)):
        if value not in (0, 1):
            raise DataPrepError(f"{rec.at()}: column '{key}' should be 0 or 1, got {value!r}")
    responses = []
    for i in (0, 1):
        severity = field(rec, f"response_{i}_severity_level", int, optional=True)
        if severity is not None and not 0 <= severity <= 3:
            raise DataPrepError(f"{rec.at()}: column 'response_{i}_severity_level' should be 0-3, got {severity!r}")
        harm = field(rec, f"response_{i}_harm_category", dict, optional=True) or {}
        if not all(isinstance(v, bool) for v in harm.values()):
            raise DataPrepError(f"{rec.at()}: column 'response_{i}_harm_category' should map names to bools")
        field(rec, f"response_{i}_source", str, optional=True)
        text = field(rec, f"response_{i}", str)
        is_safe = field(rec, f"is_response_{i}_safe", bool)
        cats = tuple(sorted(k for k, v in harm.items() if v))
        responses.append(Response(text, is_safe, severity, safer == i, better == i, cats))
    field(rec, "prompt_source", str, optional=True)
    return prompt, (responses[0], responses[1])


def group_prompts(records: list[Record]) -> tuple[dict[str, Prompt], Counter]:
    """Rows grouped by normalised prompt (first spelling kept), plus schema counts."""
    groups: dict[str, Prompt] = {}
    counts: Counter = Counter()
    for rec in records:
        prompt, pair = parse_row(rec)
        key = norm_text(prompt)
        if not key:
            raise DataPrepError(f"{rec.at()}: column 'prompt' is empty")
        counts["rows_with_severity" if pair[0].severity is not None else "rows_without_severity"] += 1
        groups.setdefault(key, Prompt(prompt.strip())).rows.append(pair)
    return groups, counts


def safe_target(prompt: Prompt) -> str | None:
    """The safe response used as target, or None when no response of the prompt is safe."""
    contrast = [p for p in prompt.rows if any(r.safe for r in p) and not all(r.safe for r in p)]
    with_safe = contrast or [p for p in prompt.rows if any(r.safe for r in p)]
    if not with_safe:
        return None
    pair = with_safe[0]
    safe = [r for r in pair if r.safe]
    return safe[0].text if len(safe) == 1 else next(r.text for r in pair if r.is_better)


def rejected_response(prompt: Prompt) -> Response | None:
    """The most severe unsafe response; ties: not the safer one of its row, then the first row."""
    ranked = [
        ((r.severity if r.severity is not None else 0), not r.is_safer, -row, r)
        for row, pair in enumerate(prompt.rows)
        for r in pair
        if not r.safe
    ]
    return max(ranked, key=lambda t: t[:3])[3] if ranked else None


def read_refusals(path: str | None) -> dict[str, str]:
    """`{normalised prompt: refusal}` from a jsonl of `{prompt, refusal}`."""
    if path is None:
        return {}
    if not path.endswith(".jsonl") or not Path(path).is_file():
        raise DataPrepError(f"{path}: --refusals needs an existing .jsonl file of {{prompt, refusal}}")
    return {norm_text(field(r, "prompt", str)): field(r, "refusal", str) for r in read_local(path)}


def categories(prompt: Prompt) -> set[str]:
    """Harm categories flagged on any unsafe response of the prompt."""
    return {c for pair in prompt.rows for r in pair if not r.safe for c in r.categories}


def choose_targets(
    groups: dict[str, Prompt], keys: list[str], refusals: dict[str, str], counts: Counter
) -> dict[str, str]:
    """Target per prompt ("" when none), counting safe-response / refusal / dropped."""
    targets: dict[str, str] = {}
    for key in keys:
        target = safe_target(groups[key])
        if target is None and key in refusals:
            counts["target_refusal"] += 1
            target = refusals[key]
        elif target is not None:
            counts["target_safe_response"] += 1
        else:
            counts["dropped_no_target"] += 1
        targets[key] = target or ""
    return targets


def refusal_targets(keys: list[str], refusals: dict[str, str], counts: Counter) -> dict[str, str]:
    """`--sft-target refusal`: the refusal of every prompt ("" when it has none), counted."""
    targets = {key: refusals.get(key, "") for key in keys}
    for target in targets.values():
        counts["target_refusal" if target else "dropped_no_refusal"] += 1
    return targets


def split_keys(
    harmful: list[str], targets: dict[str, str], sizes: dict[str, int], disjoint: bool
) -> dict[str, list[str]]:
    """Eval first, then SFT and DPO from the prompts left that have a target."""
    eval_keys = harmful[: sizes["eval"]]
    pool = [k for k in harmful[sizes["eval"] :] if targets[k]]
    sft = pool[: sizes["sft"]]
    dpo = pool[len(sft) : len(sft) + sizes["dpo"]] if disjoint else pool[: sizes["dpo"]]
    return {"saferlhf_sft": sft, "saferlhf_dpo": dpo, "saferlhf_eval": eval_keys}


def make_row(name: str, prompt: Prompt, target: str) -> dict[str, Any]:
    """One output row of split `name` in Alpaca (or Alpaca ranking) format."""
    row: dict[str, Any] = {"instruction": prompt.text, "input": ""}
    if name == "saferlhf_dpo":
        return {**row, "chosen": target, "rejected": rejected_response(prompt).text}
    if name == "saferlhf_eval":
        row["harm_categories"] = sorted(categories(prompt))
    return {**row, "output": target}


def category_counts(groups: dict[str, Prompt], keys: list[str]) -> dict[str, int]:
    """Number of prompts per harm category (flagged on any unsafe response)."""
    return dict(sorted(Counter(c for k in keys for c in categories(groups[k])).items()))


def build(
    records: list[Record],
    refusals: dict[str, str],
    sizes: dict[str, int],
    seed: int,
    disjoint: bool = False,
    sft_target: str = "safe",
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The three splits as rows, and the counts for the stats file."""
    groups, counts = group_prompts(records)
    counts.update(
        rows_read=len(records), unique_prompts=len(groups), duplicate_rows_collapsed=len(records) - len(groups)
    )
    harmful = sorted(k for k, g in groups.items() if rejected_response(g) is not None)
    counts.update(skipped_no_unsafe_response=len(groups) - len(harmful), harmful_prompts=len(harmful))
    random.Random(seed).shuffle(harmful)

    def pick(keys: list[str], tally: Counter) -> dict[str, str]:
        if sft_target == "refusal":
            return refusal_targets(keys, refusals, tally)
        return choose_targets(groups, keys, refusals, tally)

    targets = pick(harmful[sizes["eval"] :], counts)  # target counts cover the training pool only
    targets.update(pick(harmful[: sizes["eval"]], Counter()))
    keys = split_keys(harmful, targets, sizes, disjoint)
    counts["training_pool"] = sum(1 for k in harmful[sizes["eval"] :] if targets[k])
    counts["eval_without_target"] = sum(1 for k in keys["saferlhf_eval"] if not targets[k])
    data = {name: [make_row(name, groups[k], targets[k]) for k in ks] for name, ks in keys.items()}
    per_cat = {name: category_counts(groups, ks) for name, ks in keys.items()}
    per_cat["all_harmful_prompts"] = category_counts(groups, harmful)
    return data, {"counts": dict(sorted(counts.items())), "harm_categories": per_cat}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `saferlhf` on the `ogpsa data` parser."""
    p = subparsers.add_parser(
        "saferlhf",
        help="PKU-SafeRLHF -> saferlhf_sft / saferlhf_dpo / saferlhf_eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder (dataset_dir for LLaMA-Factory)")
    p.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help="Hub id OWNER/NAME[:CONFIG][@SPLIT] or local .parquet/.jsonl/.json file or folder "
        f"(default {DEFAULT_SOURCE})",
    )
    p.add_argument("--config", default=None, help="Hub config name (same as ID:CONFIG)")
    p.add_argument("--split", default="train", help="Hub split (default train)")
    p.add_argument("--sft-size", type=int, default=10000, help="cap on SFT rows (paper: 10000)")
    p.add_argument("--dpo-size", type=int, default=10000, help="cap on DPO pairs (paper: 10000)")
    p.add_argument("--eval-size", type=int, default=500, help="held-out harmful prompts (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--refusals",
        default=None,
        help="jsonl of {prompt, refusal}: the target when no response is safe (with --sft-target refusal: always)",
    )
    p.add_argument(
        "--sft-target",
        choices=("safe", "refusal"),
        default="safe",
        help="SFT output and DPO chosen: a safe response of the data (default), or the prompt's refusal "
        "from --refusals for every prompt, as the paper does (prompts without one are dropped)",
    )
    p.add_argument("--disjoint-sft-dpo", action="store_true", help="give DPO other prompts than SFT")
    p.add_argument("--overwrite", action="store_true", help="replace existing files / registry entries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute `ogpsa data saferlhf`."""
    sizes = {"sft": args.sft_size, "dpo": args.dpo_size, "eval": args.eval_size}
    if min(sizes.values()) < 0:
        raise DataPrepError("--sft-size/--dpo-size/--eval-size must be >= 0")
    if args.sft_target == "refusal" and not args.refusals:
        raise DataPrepError("--sft-target refusal: needs --refusals FILE (jsonl of {prompt, refusal})")
    refusals = read_refusals(args.refusals)
    records = read_source(args.source, args.config, args.split)
    data, stats = build(records, refusals, sizes, args.seed, args.disjoint_sft_dpo, args.sft_target)
    for name, cap in (("saferlhf_sft", sizes["sft"]), ("saferlhf_dpo", sizes["dpo"]), ("saferlhf_eval", sizes["eval"])):
        if len(data[name]) < cap:
            warn(f"{name}: only {len(data[name])} rows available (asked for {cap})")
    stats.update(
        command="saferlhf",
        source=args.source,
        config=args.config,
        split=args.split,
        seed=args.seed,
        refusals=args.refusals,
        sft_target=args.sft_target,
        disjoint_sft_dpo=args.disjoint_sft_dpo,
        requested=sizes,
        files={name: file_summary(name, rows) for name, rows in data.items()},
    )
    entries = {
        "saferlhf_sft": sft_info("saferlhf_sft"),
        "saferlhf_dpo": ranking_info("saferlhf_dpo"),
        "saferlhf_eval": sft_info("saferlhf_eval"),
    }
    paths = write_outputs(Path(args.out), data, entries, "saferlhf_stats.json", stats, args.overwrite)
    for path in paths:
        print(path)
    print(json.dumps({k: len(v) for k, v in data.items()}, sort_keys=True))
    return 0
