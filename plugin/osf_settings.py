"""Settings of `ogpsa_method: osf` (PEFT's orthogonal subspace fine-tuning): the `ogpsa_osf_*` keys.

Standard library only: `settings.split_ogpsa_args` parses these keys with `parse_osf_args` and
`engines.check_arguments` refuses what OSF cannot run on with `check_osf_engine`. Both raise
`ValueError` whose message starts with the key; the callers turn it into their one-line
`OGPSAConfigError` with the file name in front (this module cannot import `settings`, which imports it).

What is exposed, and why only this: PEFT's `OSFConfig` has three fields that change training
(`effective_rank`, `target_modules`, `rank_pattern`); its others (`init_weights`, `modules_to_save`,
`target_svd_config`) are accepted by PEFT 0.18.1 for compatibility and ignored, so giving them
would change nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

OSF_PREFIX = "ogpsa_osf_"
# The keys an `ogpsa_method: osf` stage takes besides its own: OSF needs no reference data, so the
# reference, schedule and basis keys of the other methods are errors, not silent no-ops.
OSF_SHARED_KEYS = ("ogpsa_method", "ogpsa_target")
Rank = Union[int, float]


@dataclass
class OSFArguments:
    """`ogpsa_method: osf`: PEFT's OSFConfig, from the stage's YAML (keys are the field names)."""

    ogpsa_osf_effective_rank: Rank = field(
        default=0.5,
        metadata={
            "help": "Top singular directions of each wrapped weight that stay fixed (PEFT's effective_rank): an "
            "integer >= 1 is a count, a number in (0, 1) a fraction of the weight's smaller dimension. The update "
            "of a weight then lies in the complement of its top directions, on both sides, with rank at most "
            "min(out, in) - kept. 0.5: PEFT's default (half)."
        },
    )
    ogpsa_osf_target_modules: str = field(
        default="",
        metadata={
            "help": "Which linear layers OSF wraps (PEFT's target_modules). '': PEFT's list for the architecture "
            "(every attention and MLP projection for llama, qwen2, qwen3, mistral, gemma, ...), else every "
            "linear layer but the output head; 'all-linear'; or comma-separated module names (e.g. "
            "q_proj,v_proj,down_proj). Everything OSF does not wrap (embeddings, norms, the output head, other "
            "linears) is frozen, as in PEFT."
        },
    )
    ogpsa_osf_rank_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer overrides of ogpsa_osf_effective_rank (PEFT's rank_pattern): a mapping from a "
            "regular expression, searched in the module's full name, to a count or fraction as above; the first "
            "matching pattern wins. On a command line: JSON text, e.g. '{\"mlp\": 0.75}'."
        },
    )


def osf_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(OSFArguments))


def _rank(key: str, value: Any) -> Rank:
    """A count (int >= 1) or a fraction (float in (0, 1)); YAML and command lines give text too."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise ValueError(f"{key}: expected a count (integer >= 1) or a fraction in (0, 1), got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a count (integer >= 1) or a fraction in (0, 1), got {value!r}")
    if isinstance(value, float) and value.is_integer() and value >= 1:
        raise ValueError(f"{key}: {value!r} is ambiguous (PEFT reads a float as a fraction); write {int(value)} "
                         "for a count of directions")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{key}: a count of kept directions must be >= 1, got {value}; OSF with nothing kept is "
                         "plain full fine-tuning of those layers")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError(f"{key}: a fraction must be in (0, 1), got {value}")
    return value


def parse_osf_args(keys: dict[str, Any]) -> OSFArguments:
    """The `ogpsa_osf_*` keys of a stage, typed and checked. Raises ValueError('<key>: ...')."""
    known = {f.name for f in osf_fields()}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: unknown OSF key(s); known keys: {sorted(known)}")
    values: dict[str, Any] = {}
    if "ogpsa_osf_effective_rank" in keys:
        values["ogpsa_osf_effective_rank"] = _rank("ogpsa_osf_effective_rank", keys["ogpsa_osf_effective_rank"])
    if "ogpsa_osf_target_modules" in keys:
        targets = keys["ogpsa_osf_target_modules"]
        if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
            targets = ",".join(targets)
        if not isinstance(targets, str) or any(not t.strip() for t in targets.split(",")) and targets.strip():
            raise ValueError(f"ogpsa_osf_target_modules: expected 'all-linear' or comma-separated module names, "
                             f"got {keys['ogpsa_osf_target_modules']!r}")
        values["ogpsa_osf_target_modules"] = ",".join(t.strip() for t in targets.split(",") if t.strip())
    if "ogpsa_osf_rank_pattern" in keys:
        values["ogpsa_osf_rank_pattern"] = _pattern(keys["ogpsa_osf_rank_pattern"])
    return OSFArguments(**values)


def _pattern(value: Any) -> dict[str, Rank]:
    key = "ogpsa_osf_rank_pattern"
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: expected a mapping (JSON text on a command line), got {value!r} ({e})") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected a mapping from a regular expression to a rank, got {value!r}")
    out = {}
    for pattern, rank in value.items():
        try:
            re.compile(str(pattern))
        except re.error as e:
            raise ValueError(f"{key}: {pattern!r} is not a regular expression ({e})") from None
        out[str(pattern)] = _rank(f"{key}[{pattern!r}]", rank)
    return out


def check_osf_engine(get: Callable[[str], Any]) -> None:
    """Refuse the set-ups OSF cannot run on, from the arguments alone. Raises ValueError('<key>: ...').

    One process and DDP only: PEFT decomposes each whole weight when it wraps the model, which a
    ZeRO-3 or FSDP shard is not, and under any ZeRO stage or FSDP2 the optimizer steps its own
    float32 partitions, which the step projection (`ogpsa_target: update`) does not reach.
    """
    finetuning_type = get("finetuning_type") or "lora"  # LLaMA-Factory's default is LoRA
    if finetuning_type != "full":
        raise ValueError(f"finetuning_type: ogpsa_method=osf wraps the model's linear layers itself and needs "
                         f"finetuning_type: full (got {finetuning_type!r}); OSF is not combined with LoRA, OFT or freeze")
    if get("deepspeed"):
        raise ValueError("deepspeed: ogpsa_method=osf runs on one process or DDP (PEFT decomposes whole weights, "
                         "and ZeRO steps its own partitions); remove deepspeed")
    if get("fsdp"):
        raise ValueError("fsdp: ogpsa_method=osf runs on one process or DDP (PEFT decomposes whole weights); "
                         "remove fsdp")
    for flag in ("use_unsloth", "quantization_bit"):  # other loaders and frozen quantised weights
        if get(flag):
            raise ValueError(f"{flag}: not supported with ogpsa_method=osf")


def osf_config_kwargs(settings: OSFArguments) -> dict[str, Any]:
    """The keyword arguments of PEFT's `OSFConfig` for these settings."""
    targets = settings.ogpsa_osf_target_modules
    return {
        "effective_rank": settings.ogpsa_osf_effective_rank,
        "target_modules": None if not targets else "all-linear" if targets == "all-linear" else targets.split(","),
        "rank_pattern": dict(settings.ogpsa_osf_rank_pattern) or None,
    }


def osf_markdown() -> str:
    """The guide's OSF settings table, made from the fields' help so the two cannot drift apart."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in osf_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "PEFT's list" if f.name == "ogpsa_osf_target_modules" else f"`{default}`" if default != {} else "none"
        meaning = " ".join(f.metadata.get("help", "").split()).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {shown} | {meaning} |")
    return "\n".join(rows)
