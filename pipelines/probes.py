"""Probe loading for `ogpsa eval`: prompt and answer files or datasets, the reference exclusion, and
the BIG-bench HHH multiple-choice probe. Every probe whose prompt is a prompt of an `--exclude`
reference set (after `norm_text`) is dropped, and the drops are counted."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..plugin.files import norm_text

from ..plugin.files import DatasetInfoError, read_dataset_info
from .eval_config import EvalConfig, EvalError

PROMPT_KEYS = ("instruction", "prompt", "question", "goal", "value", "query", "text")
ANSWER_KEYS = ("output", "response", "answer", "target", "completion")
# file stems too generic to label a source alone: "gsm8k/test.jsonl" is labelled gsm8k_test
GENERIC_STEMS = {"test", "train", "eval", "validation", "dev", "data", "task", "prompts"}


@dataclass
class ProbeSet:
    """The probes of one source after exclusion: [{prompt, answer}] and how many were dropped."""

    source: str
    probes: list[dict]
    n_excluded: int = 0


@dataclass
class HHHSet:
    """BIG-bench HHH probes after exclusion: {subset: [{input, choices, correct}]}."""

    source: str
    subsets: dict[str, list[dict]] = field(default_factory=dict)
    n_excluded: int = 0


def read_rows(path: Path) -> list:
    """Rows of a json (list or {"examples"|"data"|"seeds"|"prompts": list}), jsonl, yaml or txt file."""
    if not path.is_file():
        raise EvalError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".txt":
            return [line.strip() for line in text.splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix in (".yaml", ".yml"):
            import yaml

            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError and yaml's errors are ValueErrors
        raise EvalError(f"cannot parse {path}: {e}") from e
    if isinstance(obj, dict):
        for key in ("examples", "data", "seeds", "prompts"):
            if isinstance(obj.get(key), list):
                return obj[key]
        raise EvalError(f"{path}: expected a list of rows (or a dict with examples/data/seeds)")
    if not isinstance(obj, list):
        raise EvalError(f"{path}: expected a list of rows")
    return obj


def resolve_source(src: str, dataset_dir: str | None) -> tuple[Path, dict]:
    """A file path, or a dataset name looked up in dataset_dir/dataset_info.json -> (path, columns)."""
    path = Path(src).expanduser()
    if path.is_file():
        return path, {}
    if dataset_dir:
        try:
            info = read_dataset_info(dataset_dir)
        except DatasetInfoError as e:
            raise EvalError(f"dataset_dir {dataset_dir}: {e}") from None
        if info is None:
            raise EvalError(f"dataset_dir {dataset_dir}: Hub datasets are not supported, give a local folder")
        info_path = Path(dataset_dir) / "dataset_info.json"
        if src in info:
            entry = info[src]
            if "file_name" not in entry:
                raise EvalError(f"dataset {src!r} in {info_path} has no local file_name (hub datasets are not supported)")
            return Path(dataset_dir) / entry["file_name"], entry.get("columns", {})
        raise EvalError(f"{src!r} is neither a file nor a dataset name in {info_path}")
    raise EvalError(f"data file not found: {src} (give a path, or --dataset-dir for dataset names)")


def row_prompt(row, columns: dict) -> str | None:
    """Prompt text of a row: instruction (+ '\\n' + input, as LLaMA-Factory's alpaca converter)."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return None
    key = columns.get("prompt") or next((k for k in PROMPT_KEYS if row.get(k)), None)
    if not key or not row.get(key):
        return None
    extra = row.get(columns.get("query", "input")) or ""
    return f"{row[key]}\n{extra}" if extra else str(row[key])


def row_answer(row, columns: dict) -> str | None:
    if not isinstance(row, dict):
        return None
    key = columns.get("response") or next((k for k in ANSWER_KEYS if isinstance(row.get(k), str)), None)
    return row.get(key) if key else None


def source_label(src: str) -> tuple[str, str]:
    """(label, source) from `LABEL=SRC` or SRC (label: dataset name or file stem)."""
    if "=" in src and not Path(src).exists():
        label, src = src.split("=", 1)
        return label.strip(), src.strip()
    path = Path(src)
    stem = path.stem if path.suffix else src
    if stem.lower() in GENERIC_STEMS and path.parent.name:
        stem = f"{path.parent.name}_{stem}"
    return stem, src


def load_probes(src: str, cfg: EvalConfig, banned: set[str], need_answer: bool) -> tuple[list[dict], int]:
    """Probes {prompt, answer?} of one source minus the banned (reference) prompts -> (probes, n_dropped)."""
    path, columns = resolve_source(src, cfg.dataset_dir)
    probes, dropped = [], 0
    for row in read_rows(path):
        prompt = row_prompt(row, columns)
        answer = row_answer(row, columns) if need_answer else None
        if not prompt or (need_answer and not answer):
            continue
        if norm_text(prompt) in banned:
            dropped += 1
            continue
        probes.append({"prompt": prompt, "answer": answer})
    if not probes:
        raise EvalError(f"no usable {'prompt/answer' if need_answer else 'prompt'} rows in {path} after exclusion")
    return probes[: cfg.max_samples] if cfg.max_samples else probes, dropped


def reference_prompts(cfg: EvalConfig) -> set[str]:
    """Normalised prompts of every --exclude reference set (with and without their input)."""
    banned = set()
    for src in cfg.exclude:
        path, columns = resolve_source(source_label(src)[1], cfg.dataset_dir)
        for row in read_rows(path):
            prompt = row_prompt(row, columns)
            if prompt:
                banned.add(norm_text(prompt))
                if isinstance(row, dict) and row.get("instruction"):
                    banned.add(norm_text(str(row["instruction"])))
    return banned


def _hhh_row(ex, where: Path) -> dict:
    """{input, choices, correct} of a BIG-bench example or of an `ogpsa data refsets` hhh_eval row."""
    if isinstance(ex, dict) and isinstance(ex.get("target_scores"), dict) and ex.get("input"):
        choices = list(ex["target_scores"])
        correct = max(range(len(choices)), key=lambda i: ex["target_scores"][choices[i]])
        return {"input": ex["input"], "choices": choices, "correct": correct}
    if isinstance(ex, dict) and isinstance(ex.get("choices"), list) and isinstance(ex.get("label"), int):
        prompt = row_prompt(ex, {})
        if prompt and 0 <= ex["label"] < len(ex["choices"]):
            return {"input": prompt, "choices": ex["choices"], "correct": ex["label"]}
    raise EvalError(f"{where}: HHH rows need `input` and `target_scores` (BIG-bench) or `instruction`, `choices` "
                    "and `label` (hhh_eval of ogpsa data refsets)")


def load_hhh(src: str, dataset_dir: str | None = None) -> dict[str, list[dict]]:
    """HHH examples per subset: {subset: [{input, choices, correct}]}; a folder is searched for
    BIG-bench task.json files (subset: the folder name), a file or dataset name is one subset."""
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("task.json"))
        if not files:
            raise EvalError(f"no BIG-bench task.json found at {path}")
        return {f.parent.name: [_hhh_row(ex, f) for ex in read_rows(f)] for f in files}
    if not path.is_file() and not dataset_dir:
        raise EvalError(f"no BIG-bench task.json found at {path}")
    path, _ = resolve_source(src, dataset_dir)
    return {path.stem: [_hhh_row(ex, path) for ex in read_rows(path)]}


def hhh_probes(cfg: EvalConfig, banned: set[str]) -> HHHSet:
    """The HHH probes of `cfg.hhh` minus those whose input is a reference prompt; none left is an error."""
    result = HHHSet(cfg.hhh)
    for subset, rows in load_hhh(cfg.hhh, cfg.dataset_dir).items():
        kept = [r for r in rows if norm_text(r["input"]) not in banned]
        result.n_excluded += len(rows) - len(kept)
        if kept:
            result.subsets[subset] = kept[: cfg.max_samples] if cfg.max_samples else kept
    if not result.subsets:
        raise EvalError(
            f"--hhh: all {result.n_excluded} HHH probes of {cfg.hhh} are prompts of the --exclude reference sets, "
            "none is left to measure; keep a held-out HHH split (e.g. `ogpsa data refsets --hhh-n 50 --eval-n 50`, "
            "then --hhh hhh_eval)"
        )
    return result
