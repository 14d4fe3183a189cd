"""Settings of `ogpsa eval`: `EvalConfig`, its error, and the defaults a pipeline run implies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..plugin.files import DatasetInfoError, read_dataset_info

# written by the pipeline runner into every stage folder: the stage's LLaMA-Factory arguments
STAGE_CONFIG = "stage_config.yaml"


class EvalError(ValueError):
    """Bad input for the evaluation (a path or key); the CLI prints it and exits 2."""


def _f(default: Any, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EvalConfig:
    """Settings of one evaluation; every field has a help text (also used by the CLI)."""

    capability: list = _f([], "capability sources for answer NLL: files or dataset names, `LABEL=SRC` to name one")
    exclude: list = _f([], "reference sets (files or dataset names) whose prompts must not be probed, HHH included")
    harmful: str | None = _f(None, "harmful prompts (txt/json/jsonl/yaml file or dataset name) for the refusal rate")
    benign: str | None = _f(None, "benign prompts (same formats) for the over-refusal rate")
    hhh: str | None = _f(None, "BIG-bench hhh_alignment task.json file or a folder searched for task.json files, "
                               "or an hhh_eval set of `ogpsa data refsets` (file or dataset name)")
    dataset_dir: str | None = _f(None, "folder with dataset_info.json, to resolve dataset names")
    template: str = _f("qwen", "LLaMA-Factory chat template used to format every prompt")
    system: str | None = _f(None, "system prompt (default: the template's default system)")
    max_samples: int | None = _f(None, "at most this many probes per source (first ones after exclusion)")
    batch_size: int = _f(8, "batch size for scoring and generation")
    max_new_tokens: int = _f(64, "tokens generated per safety prompt (greedy)")
    cutoff_len: int = _f(1024, "longest prompt+answer scored; prompts are cut from the left first")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N (auto: cuda when available)")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    judge: str | None = _f(None, "also judge the answers with this local Hugging Face sequence-classification model")
    judge_label: str | None = _f(None, "the judge's label to count (default: its one label named refus*/reject*)")
    judge_pair: bool = _f(False, "give the judge (prompt, answer) text pairs instead of the answer alone")
    lm_eval_tasks: list = _f([], "lm-evaluation-harness tasks, e.g. gsm8k,mmlu,ifeval (needs `pip install lm-eval`)")
    lm_eval_limit: int | None = _f(None, "limit per lm-eval task (for quick runs)")
    lm_eval_include_path: str | None = _f(
        None, "folder of your own lm-eval task YAMLs (e.g. tasks over local files, for offline machines)"
    )
    keep_generations: int = _f(5, "sample generations kept in the output per prompt set")
    progress: bool = _f(True, "show tqdm progress bars")

    LIST_FIELDS = ("capability", "exclude", "lm_eval_tasks")
    MEASURES = ("capability", "harmful", "benign", "hhh", "lm_eval_tasks")

    @classmethod
    def from_dict(cls, data: dict | None) -> "EvalConfig":
        """Build from a dict (a recipe's `eval:` block); unknown keys raise EvalError naming them."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise EvalError(f"unknown eval config key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
        for key in cls.LIST_FIELDS:
            if isinstance(data.get(key), str):
                data[key] = [s.strip() for s in data[key].split(",") if s.strip()]
            elif data.get(key) is None and key in data:
                data[key] = []
        return cls(**data)

    def wants_anything(self) -> bool:
        """Whether at least one measure is requested."""
        return any(getattr(self, key) for key in self.MEASURES)


# ------------------------------------------------------------------------------ defaults of a run


def _stage_configs(path: Path) -> list[Path]:
    """The runner's stage configs behind `path`: every stage of a pipeline folder, or the stage that
    wrote a model folder (the folder itself, or the stage folder of a merged LoRA model)."""
    if (path / "pipeline.json").is_file():
        return sorted(path.glob(f"*/{STAGE_CONFIG}"))
    for folder in (path, path.parent) if path.name == "merged" else (path,):
        if (folder / STAGE_CONFIG).is_file():
            return [folder / STAGE_CONFIG]
    return []


def _read_mapping(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise EvalError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise EvalError(f"{path}: expected a mapping of training arguments")
    return data


def _only(names: list[str]) -> str | None:
    return names[0] if len(names) == 1 else None


def _has_choices(dataset_dir: Path, entry: dict) -> bool:
    """Whether a registered set holds multiple-choice rows (`choices` and `label`: an hhh_eval)."""
    try:
        rows = json.loads((dataset_dir / entry.get("file_name", "")).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and bool(rows) and isinstance(rows[0], dict) and {"choices", "label"} <= set(rows[0])


def held_out_sets(dataset_dir: Path, info: dict) -> dict[str, Any]:
    """EvalConfig measures from a dataset_info.json: the `*_eval` sets by role, `*_ref` excluded."""
    held = sorted(n for n, e in info.items() if n.endswith("_eval") and not e.get("ranking"))
    harmful = "saferlhf_eval" if "saferlhf_eval" in held else _only([n for n in held if "harmful" in n])
    benign = _only([n for n in held if "benign" in n])
    hhh = _only([n for n in held if n.endswith("hhh_eval") and _has_choices(dataset_dir, info[n])])
    measures = {"capability": [n for n in held if n not in (harmful, benign)], "harmful": harmful,
                "benign": benign, "hhh": hhh}
    return {k: v for k, v in measures.items() if v}


def run_defaults(path: Path, dataset_dir: str | None = None) -> tuple[dict[str, Any], str]:
    """(EvalConfig defaults, why there are none) for a folder the pipeline runner wrote.

    Defaults: the run's dataset_dir (or `dataset_dir`), its template, its held-out sets
    (`held_out_sets`) and, as exclusions, its `ogpsa_reference` sets plus every registered `*_ref`
    set, so that a plain baseline run is probed on the same rows as its OGPSA twin.
    """
    configs = [(p, _read_mapping(p)) for p in _stage_configs(path)]
    if not configs:
        return {}, f"{path} was not written by the pipeline runner (no {STAGE_CONFIG})"
    where, first = configs[0]
    folder = Path(dataset_dir or first.get("dataset_dir", "data")).expanduser()
    info_path = folder / "dataset_info.json"
    try:
        info = read_dataset_info(folder)
    except DatasetInfoError as e:
        if not e.missing:
            raise EvalError(str(e)) from None
        info = None
    if info is None:  # missing here, or a Hub dataset_dir
        return {}, f"the run's dataset_dir {str(folder)!r} ({where}) has no dataset_info.json from here; pass --dataset-dir"
    references = [n.strip() for _, c in configs for n in str(c.get("ogpsa_reference", "")).split(",") if n.strip()]
    references += sorted(n for n in info if n.endswith("_ref"))
    measures = held_out_sets(folder, info)
    defaults = {"dataset_dir": str(folder), "exclude": list(dict.fromkeys(references)), **measures}
    if first.get("template"):
        defaults["template"] = first["template"]
    return defaults, "" if measures else f"{info_path} registers no *_eval set"
