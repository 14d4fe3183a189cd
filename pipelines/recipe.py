"""Pipeline recipes: one YAML, shared LLaMA-Factory keys at the top and a `stages:` list.

    model_name_or_path: Qwen/Qwen2.5-7B-Instruct     # shared by every stage
    ogpsa_reference: gsm8k_ref,alpaca_ref,hhh_ref     # ogpsa_* keys reach only ogpsa_* stages
    output_dir: saves/qwen_sft_dpo                   # pipeline root: <output_dir>/<NN>_<name>/
    stages:
      - {name: sft, stage: ogpsa_sft, dataset: saferlhf_sft, ogpsa_refresh_steps: 30}
      - {name: dpo, stage: ogpsa_dpo, dataset: saferlhf_dpo, ogpsa_refresh_steps: 5}
    eval: {...}                                      # optional, see ogpsa.pipelines.evaluate

Command-line overrides (`key=value`) apply to every stage; `STAGENAME.key=value` to one.
Everything is validated before anything trains: unknown keys (LLaMA-Factory's and OGPSA's),
unknown stage types, duplicate names, datasets and reference sets missing from
dataset_info.json, a DPO stage without preference data. Errors name the stage and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..plugin.files import DatasetInfoError, dataset_names, info_path, read_dataset_info
from ..plugin.osf_settings import OSF_PREFIX, OSF_SHARED_KEYS
from ..plugin.preflight import preflight
from ..plugin.settings import PREFIX, OGPSAConfigError

STAGE_TYPES = ("sft", "dpo", "ogpsa_sft", "ogpsa_dpo")
PREFERENCE_STAGES = ("dpo", "ogpsa_dpo")
# Keys of the recipe itself, never passed to LLaMA-Factory.
RECIPE_KEYS = ("stages", "eval", "force")
# Keys the runner sets per stage; a recipe may not set them inside a stage.
MANAGED_KEYS = ("output_dir", "overwrite_output_dir")


class RecipeError(OGPSAConfigError):
    """A recipe that cannot run; the message names the file, the stage and the key."""


@dataclass
class StageSpec:
    """One resolved stage: its index, name, type and the complete LLaMA-Factory arguments."""

    index: int
    name: str
    stage: str
    args: dict[str, Any]

    @property
    def dirname(self) -> str:
        return f"{self.index + 1:02d}_{self.name}"


@dataclass
class Recipe:
    """A validated recipe. `stages[i].args` lacks `model_name_or_path` for i > 0 (set at run time)."""

    path: str
    sha256: str
    output_dir: str
    stages: list[StageSpec]
    eval: dict[str, Any] | None = None
    force: bool = False
    base_model: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def load(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, merge overrides into, and validate a recipe file."""
    from omegaconf import OmegaConf

    try:
        text = open(path, "rb").read()
        conf = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_cli(list(overrides or [])))
        raw = OmegaConf.to_container(conf, resolve=True)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except Exception as e:  # YAML and OmegaConf syntax errors
        raise RecipeError(f"{path}: cannot read recipe ({e})") from None
    return resolve(raw, path, hashlib.sha256(text).hexdigest())


def resolve(raw: dict[str, Any], path: str = "<recipe>", sha256: str = "") -> Recipe:
    where = f"{path}: "
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{where}stages: expected a non-empty list of stages")
    names = [s.get("name") if isinstance(s, dict) else None for s in stages_raw]
    shared = {k: v for k, v in raw.items() if k not in RECIPE_KEYS and k not in names}
    _beside_recipe(shared, path)
    per_stage_cli = {k: v for k, v in raw.items() if k in names and isinstance(v, dict)}
    if "output_dir" not in shared:
        raise RecipeError(f"{where}output_dir: required (the pipeline root; stages write <output_dir>/<NN>_<name>/)")
    if "model_name_or_path" not in shared:
        raise RecipeError(f"{where}model_name_or_path: required at the top of the recipe (the first stage's model)")
    stages = [_stage(i, s, shared, per_stage_cli, where) for i, s in enumerate(stages_raw)]
    seen = set()
    for spec in stages:
        if spec.name in seen:
            raise RecipeError(f"{where}stages[{spec.index}].name: duplicate stage name {spec.name!r}")
        seen.add(spec.name)
    for spec in stages:
        _check_stage(spec, where)
    _check_eval(raw.get("eval"), where)
    return Recipe(
        path=os.path.abspath(path),
        sha256=sha256,
        output_dir=str(shared["output_dir"]),
        stages=stages,
        eval=raw.get("eval"),
        force=bool(raw.get("force", False)),
        base_model=str(shared["model_name_or_path"]),
        raw=raw,
    )


def _beside_recipe(shared: dict, path: str) -> None:
    """A relative `deepspeed:` config missing from the working directory is looked up next to the
    recipe file, so a recipe and the config shipped beside it run from anywhere."""
    config = shared.get("deepspeed")
    if isinstance(config, str) and not os.path.isabs(config) and not os.path.exists(config):
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), config)
        if os.path.exists(beside):
            shared["deepspeed"] = beside


def _stage(index: int, entry: Any, shared: dict, cli: dict, where: str) -> StageSpec:
    at = f"{where}stages[{index}]"
    if not isinstance(entry, dict):
        raise RecipeError(f"{at}: expected a mapping with `name` and `stage`")
    entry = {**entry, **cli.get(entry.get("name"), {})}  # `STAGENAME.key=value` overrides
    name, stage = entry.get("name"), entry.get("stage")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise RecipeError(f"{at}.name: expected an identifier (letters, digits, _ or -), got {name!r}")
    at = f"{where}stage {name!r}"
    if stage not in STAGE_TYPES:
        raise RecipeError(f"{at}: stage: unknown stage type {stage!r}; expected one of {list(STAGE_TYPES)}")
    for key in MANAGED_KEYS:
        if key in entry:
            raise RecipeError(f"{at}: {key}: set by the pipeline runner (<output_dir>/<NN>_<name>/); remove it")
    args = copy.deepcopy(shared)
    if not stage.startswith(PREFIX):  # plain stages never see the recipe's OGPSA defaults
        args = {k: v for k, v in args.items() if not k.startswith(PREFIX)}
    entry = {k: v for k, v in entry.items() if k != "name"}
    if not stage.startswith(PREFIX):
        # a plain stage ignores OGPSA settings, its own included, so that swapping `stage:`
        # (e.g. `sft.stage=sft`) turns an OGPSA recipe into its plain baseline
        entry = {k: v for k, v in entry.items() if not k.startswith(PREFIX)}
    args.update(entry)
    if args.get("ogpsa_method") == "osf":
        # likewise an OSF stage (PEFT's OSF needs no reference data) ignores the recipe's reference and
        # schedule settings, so that `ogpsa_method=osf` turns an OGPSA recipe into its OSF baseline
        args = {k: v for k, v in args.items()
                if not k.startswith(PREFIX) or k in OSF_SHARED_KEYS or k.startswith(OSF_PREFIX)}
    if index > 0:
        args.pop("model_name_or_path", None)  # the previous stage's result, decided at run time
    args.setdefault("do_train", True)
    return StageSpec(index, name, stage, args)


def _check_stage(spec: StageSpec, where: str) -> None:
    at = f"{where}stage {spec.name!r}: "
    stock = preflight(spec.args, at)[1]  # ogpsa_* keys, engine, reference sets
    unknown = sorted(set(stock) - llamafactory_train_keys())
    if unknown:
        raise RecipeError(f"{at}{', '.join(unknown)}: unknown LLaMA-Factory key(s)")
    dataset_dir = stock.get("dataset_dir", "data")
    try:
        info = read_dataset_info(dataset_dir)
    except DatasetInfoError as e:
        raise RecipeError(f"{at}dataset_dir: {e}") from None
    if info is None:
        return  # resolved against the Hub by LLaMA-Factory at run time
    datasets = dataset_names(stock.get("dataset"))
    if not datasets and stock.get("do_train", True):
        raise RecipeError(f"{at}dataset: required for a training stage")
    wants_pairs = spec.stage in PREFERENCE_STAGES
    for name in datasets + dataset_names(stock.get("eval_dataset")):
        if name not in info:
            raise RecipeError(f"{at}dataset: {name!r} not found in {info_path(dataset_dir)}")
        if bool(info[name].get("ranking")) != wants_pairs:
            kind = "preference (ranking) data" if wants_pairs else "SFT data, not preference pairs"
            raise RecipeError(f"{at}dataset: {name!r} is not {kind}; a {spec.stage} stage needs {kind}")


def _check_eval(block: Any, where: str) -> None:
    if block is None:
        return
    if not isinstance(block, dict):
        raise RecipeError(f"{where}eval: expected a mapping of evaluation settings")
    from .eval_config import EvalConfig, EvalError

    try:
        EvalConfig.from_dict(block)
    except (EvalError, TypeError) as e:
        raise RecipeError(f"{where}eval: {e}") from None


_KEYS: set[str] | None = None


def llamafactory_train_keys() -> set[str]:
    """Every key `llamafactory-cli train` accepts (the fields of its argument dataclasses)."""
    global _KEYS
    if _KEYS is None:
        from llamafactory.hparams.parser import _TRAIN_ARGS

        _KEYS = {f.name for cls in _TRAIN_ARGS for f in dataclasses.fields(cls)}
    return _KEYS

