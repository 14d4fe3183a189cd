"""The checks before training, in one place: `preflight`.

Used by every way into a run: `llamafactory-cli train` / `ogpsa train` before launch, the recipe
runner for each stage, LlamaBoard before preview and start, the tuner integration when it builds
the callback, and the callback's `bind` (which also serves a callback attached by hand). Each
parses the `ogpsa_*` keys (`settings.split_ogpsa_args`), refuses engines and flags that cannot work
(`engines.check_arguments`) and checks that the reference sets are registered SFT sets in the run's
`dataset_info.json`.

Results are remembered for the process: a setting is parsed once, and the same settings with the
same engine arguments and registry are checked once, however many of those entries a process
passes through. Only successes are remembered; a failure raises `OGPSAConfigError` (one line, the
`where` prefix naming the file or stage) every time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

from .engines import check_arguments
from .files import DatasetInfoError, info_path, is_hub_dir, read_dataset_info
from .methods.composed.checks import check_arguments as check_composition
from .reference import ReferenceDataError
from .settings import OGPSAArguments, OGPSAConfigError, split_ogpsa_args

_parsed: dict[str, tuple[Optional[OGPSAArguments], dict[str, Any]]] = {}
_checked: dict[str, list[dict[str, Any]]] = {}


def preflight(
    args: Mapping[str, Any] | Callable[[str], Any],
    where: str = "",
    *,
    settings: Optional[OGPSAArguments] = None,
    check: bool = True,
) -> tuple[Optional[OGPSAArguments], Any]:
    """(OGPSA settings or None, the stock arguments) of a run, checked before anything starts.

    args: a LLaMA-Factory argument dict (YAML keys; its `ogpsa_*` keys are parsed and its OGPSA stage
    mapped to the stock one in the returned copy), or, with `settings` already parsed, a `get(key)`
    over LLaMA-Factory's parsed arguments (`dataset_dir` included). check=False only parses (a
    command line whose stock flags LLaMA-Factory types later; `bind` checks them).
    """
    if settings is None:
        if not isinstance(args, Mapping):
            raise TypeError("preflight: a getter needs the parsed settings")
        settings, stock = _parse(args, where)
        get = stock.get
        dataset_dir = stock.get("dataset_dir", "data")
    else:
        stock = args
        get = args.get if isinstance(args, Mapping) else args
        dataset_dir = get("dataset_dir")
        dataset_dir = "data" if dataset_dir is None else dataset_dir
    if settings is not None and check:
        _check(settings, get, dataset_dir, where)
    return settings, stock


def _parse(args: Mapping[str, Any], where: str) -> tuple[Optional[OGPSAArguments], dict[str, Any]]:
    key = json.dumps(dict(args), sort_keys=True, default=str)
    if key not in _parsed:
        _parsed[key] = split_ogpsa_args(dict(args), where)
    settings, stock = _parsed[key]
    return settings, (dict(stock) if settings is not None else args)


def _check(settings: OGPSAArguments, get: Callable[[str], Any], dataset_dir: Any, where: str) -> None:
    """Run the checks unless these settings passed them in this process with the same values of every
    argument the checks read (recorded as they read them) and the same files behind them."""
    ours = json.dumps([dataclasses.asdict(settings), dataset_dir, os.environ.get("USE_V1"),
                       _stamp(None if is_hub_dir(dataset_dir) else info_path(dataset_dir))],
                      sort_keys=True, default=str)
    for reads in _checked.get(ours, []):
        if all(_seen(get(k)) == v for k, v in reads.items()):
            return
    reads: dict[str, Any] = {}

    def recording_get(key: str) -> Any:
        value = get(key)
        reads[key] = _seen(value)
        return value

    check_composition(recording_get, settings, where)  # gradient_span+null_space: one process or DDP, no DoRA
    check_arguments(recording_get, settings, where)  # engine, offload, pure_bf16 + update, USE_V1, ...
    if isinstance(dataset_dir, str) and settings.reference_names:  # ogpsa_method=osf has none
        check_registered(settings.reference_names, dataset_dir, where)
    _checked.setdefault(ours, []).append(reads)


def _seen(value: Any) -> Any:
    """How a checked argument is remembered: False and absent alike (a parsed flag and a YAML without
    it), a file by its name, size and modification time (an edited config is checked again)."""
    if value is False:
        value = None
    return json.dumps([value, _stamp(value)], sort_keys=True, default=str)


def _stamp(path: Any) -> Any:
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def check_registered(names: list[str], dataset_dir: str, where: str = "") -> None:
    """Fail early, naming the file, when a reference set is not an SFT set in `dataset_info.json`."""
    try:
        info = read_dataset_info(dataset_dir)
    except DatasetInfoError as e:
        detail = f" (dataset_dir: {dataset_dir!r})" if e.missing else ""
        raise ReferenceDataError(f"{where}ogpsa_reference: {e}{detail}") from None
    if info is None:
        return  # resolved by LLaMA-Factory against the Hub; errors surface when loading
    path = info_path(dataset_dir)
    missing = [n for n in names if n not in info]
    if missing:
        raise ReferenceDataError(
            f"{where}ogpsa_reference: {', '.join(map(repr, missing))} not found in {path} "
            f"(registered: {', '.join(sorted(info))})"
        )
    for n in names:
        if info[n].get("ranking"):
            raise ReferenceDataError(
                f"{where}ogpsa_reference: {n!r} in {path} is a preference (ranking) dataset; use SFT data")


def clear() -> None:
    """Forget what was checked (tests that change files in place within one process)."""
    _parsed.clear()
    _checked.clear()


__all__ = ["preflight", "check_registered", "clear", "OGPSAConfigError"]
