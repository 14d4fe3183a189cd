"""OGPSA settings: the `ogpsa_*` keys of a LLaMA-Factory YAML, typed and validated before training."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .osf_settings import OSF_PREFIX, OSF_SHARED_KEYS, OSFArguments, parse_osf_args

# Stage names this package registers, and the LLaMA-Factory workflow each one runs.
OGPSA_STAGES = {"ogpsa_sft": "sft", "ogpsa_dpo": "dpo"}
# ogpsa_basis_dtype -> torch dtype (None: each parameter's own); torch is imported lazily by users.
BASIS_DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16"}
# Rebuild every 5 optimizer steps in both stages, with the previous build's directions kept
# (ogpsa_keep_previous): the paper's 30 for SFT (arXiv 2602.07892; 5 for DPO) kept almost no
# protection after a few dozen steps, and LoRA's from its first ones (docs/results.md, "Staying
# current"). The null-space method builds once per stage, as NSPO's released code does.
DEFAULT_REFRESH = {"ogpsa_sft": 5, "ogpsa_dpo": 5}
# Keys that mean something to one method only; giving one to the other method is an error, not a no-op.
METHOD_KEYS = {
    "gradient_span": ("ogpsa_granularity", "ogpsa_mode", "ogpsa_basis_dtype", "ogpsa_directions_per_set",
                      "ogpsa_keep_previous", "ogpsa_reference_rotation"),
    "null_space": ("ogpsa_null_layers", "ogpsa_null_alpha", "ogpsa_null_energy"),
}
# The two constraints composed (`methods/composed`): the span of the reference gradients projected
# into the null space, inside the null space; it takes the keys of both.
COMPOSED = "gradient_span+null_space"
METHOD_KEYS[COMPOSED] = METHOD_KEYS["gradient_span"] + METHOD_KEYS["null_space"]
PREFIX = "ogpsa_"


class OGPSAConfigError(ValueError):
    """Bad OGPSA settings; the message names the key (and the file when known)."""


@dataclass
class OGPSAArguments:
    """Settings of an `ogpsa_sft` / `ogpsa_dpo` stage (YAML keys are the field names)."""

    ogpsa_method: Literal["gradient_span", "null_space", "gradient_span+null_space", "osf"] = field(
        default="gradient_span",
        metadata={
            "help": "'gradient_span' (OGPSA): remove from each step its component along the reference sets' "
            "gradients, so each reference loss is unchanged to first order. 'null_space' (NSPO, arXiv "
            "2512.11391): restrict each constrained linear layer's weight change to the null space of its "
            "inputs on the reference sets, so those layers' outputs on the reference inputs are kept (up to "
            "ogpsa_null_alpha), not only to first order. 'gradient_span+null_space': both at once; the null "
            "space (built once per stage) restricts its layers' update, the reference gradients are projected "
            "into it before they span the subspace, so every reference loss is unchanged to first order in "
            "every tensor and the constrained layers' outputs on the reference inputs are kept (one process "
            "or DDP). 'osf': PEFT's orthogonal subspace fine-tuning, a baseline "
            "with no reference data: each wrapped weight's top singular directions stay fixed and its update lies "
            "in their complement (settings: the ogpsa_osf_* keys in docs/guide.md)."
        },
    )
    ogpsa_reference: str = field(
        default="",
        metadata={
            "help": "Comma-separated reference datasets (names in the run's dataset_info.json, SFT format). "
            "Each set contributes one gradient direction to the capability subspace. Required."
        },
    )
    ogpsa_reference_samples: int = field(
        default=100, metadata={"help": "Samples drawn from each reference set (the first N rows)."}
    )
    ogpsa_refresh_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Rebuild the subspace every K optimizer steps (gradient_span default: 5, which with "
            "ogpsa_keep_previous holds the protection; the paper used 30 for SFT and 5 for DPO; null_space "
            "default: 0; gradient_span+null_space: 5, rebuilding the span only); 0 builds it once at the start "
            "of the stage. Each rebuild reads every reference sample once (a 1/m share of them with "
            "ogpsa_reference_rotation: m)."
        },
    )
    ogpsa_granularity: Literal["tensor", "global"] = field(
        default="tensor",
        metadata={
            "help": "'tensor': project each parameter's gradient against its own slice of the reference "
            "gradients (released code); 'global': the whole model is one vector (paper's derivation)."
        },
    )
    ogpsa_mode: Literal["project", "conflict", "observe"] = field(
        default="project",
        metadata={
            "help": "'project': always remove the in-subspace component; 'conflict': only where the gradient "
            "points against a reference gradient (A-GEM style); 'observe': log cosines, change nothing."
        },
    )
    ogpsa_target: Literal["update", "gradient"] = field(
        default="update",
        metadata={
            "help": "'update': project the accumulated, clipped gradient before optimizer.step, then the "
            "optimizer's actual parameter change after it, so the reference losses are unchanged to first "
            "order under any optimizer (Adam's per-coordinate rescaling and weight decay included); costs "
            "two more passes over the basis per step (four instead of two). 'gradient': the gradient only, as the paper and "
            "its released code; first-order exact under SGD only, since Adam turns the step out of the "
            "orthogonal complement."
        },
    )
    ogpsa_basis_dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={
            "help": "Storage of the basis rows. 'auto': the dtype of the weights the projection acts on (the "
            "float32 master partitions under ZeRO and FSDP2, the parameters otherwise); 'bfloat16' halves its "
            "memory (inner products still accumulate in float32); 'float32'."
        },
    )
    ogpsa_directions_per_set: int = field(
        default=1,
        metadata={
            "help": "gradient_span: directions each reference set adds to the subspace. r > 1 splits a set's "
            "samples into r disjoint groups (sample i, longest first, goes to group i mod r) and orthonormalises "
            "each group's gradient with the rest, so the protected subspace has up to r x sets directions; "
            "memory is r x sets x trainable parameters / world size basis entries. 1: one gradient per set "
            "(the paper)."
        },
    )
    ogpsa_keep_previous: bool = field(
        default=True,
        metadata={
            "help": "gradient_span: keep the previous rebuild's directions in the subspace beside the new ones. "
            "The span of the reference gradients at two points holds their straight-line continuation, so the "
            "protection fades far less between rebuilds (measured in docs/results.md), at up to twice the "
            "basis memory. false: the subspace is only the latest rebuild's gradients (the paper)."
        },
    )
    ogpsa_reference_rotation: int = field(
        default=1,
        metadata={
            "help": "gradient_span: m > 1 splits each reference set into m shares (sample i, longest first, in "
            "share i mod m) and each rebuild reads one share, in turn (the first build of a stage reads all): "
            "the subspace holds every share's latest gradient, m x sets x ogpsa_directions_per_set directions "
            "orthonormalised together, so a rebuild costs 1/m of a full one and the whole set is covered every "
            "m rebuilds. Replaces ogpsa_keep_previous (an older gradient of a share is replaced, not kept). 1: "
            "every rebuild reads every sample."
        },
    )
    ogpsa_reference_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Micro-batch size for reference gradients (default: per_device_train_batch_size)."},
    )
    ogpsa_save_basis: bool = field(
        default=True,
        metadata={
            "help": "Save the subspace (the basis, or the null spaces) with every trainer checkpoint, so a resumed "
            "run continues the uninterrupted one. false: checkpoints leave it out (a float32 basis takes 4 bytes "
            "per trainable parameter and reference set, 12 with three sets: as much as the float32 master weights "
            "and Adam's two states together, split over the ranks under ZeRO and FSDP2) and a resumed run "
            "rebuilds it at the resume step."
        },
    )
    ogpsa_null_layers: str = field(
        default="mlp",
        metadata={
            "help": "null_space: which linear layers are constrained. 'mlp': the MLP linears (gate, up, down; "
            "as NSPO); 'all_linear': every linear layer but the output head; or comma-separated layer names "
            "(e.g. gate_proj,up_proj,down_proj,o_proj). Under LoRA the adapters' A matrices of those layers."
        },
    )
    ogpsa_null_alpha: float = field(
        default=5e-5,
        metadata={
            "help": "null_space: an input direction is in the null space when its eigenvalue of the inputs' "
            "uncentred covariance is at most alpha x the largest (NSPO's released value 5e-5). 0 keeps no "
            "direction (the constrained layers are frozen), 1 keeps all (no constraint). Not with ogpsa_null_energy."
        },
    )
    ogpsa_null_energy: Optional[float] = field(
        default=None,
        metadata={
            "help": "null_space, instead of ogpsa_null_alpha (as GPM, Saha et al. 2021): per layer, protect the "
            "fewest input directions (top eigenvectors of the inputs' uncentred covariance) whose eigenvalues "
            "hold this fraction of the reference inputs' energy (their sum); the rest is the null space. 0.99 "
            "leaves free directions holding at most 1% of the energy; 1 protects the whole range; 0 protects "
            "nothing."
        },
    )

    # ---- derived, filled by `resolve` ----
    stage: str = field(default="", metadata={"help": "internal: the ogpsa stage name"})
    osf: Optional[OSFArguments] = field(
        default=None, metadata={"help": "internal: the ogpsa_osf_* settings when ogpsa_method is osf"})

    @property
    def reference_names(self) -> list[str]:
        return [n.strip() for n in self.ogpsa_reference.split(",") if n.strip()]

    @property
    def refresh_steps(self) -> int:
        if self.ogpsa_refresh_steps is not None:
            return self.ogpsa_refresh_steps
        return 0 if self.ogpsa_method in ("null_space", "osf") else DEFAULT_REFRESH[self.stage]


def user_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(OGPSAArguments) if f.name.startswith(PREFIX)]


def _check_type(key: str, value: Any, annotation: Any, where: str) -> Any:
    """Return `value` if it fits `annotation` (int, str, Literal, Optional[...]); raise otherwise."""
    hint = typing.get_type_hints(OGPSAArguments)[key] if annotation is None else annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X] or X | None
        if value is None:
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise OGPSAConfigError(f"{where}{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if hint is bool:  # YAML gives a bool; a command-line flag gives its text
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise OGPSAConfigError(f"{where}{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OGPSAConfigError(f"{where}{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 5e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OGPSAConfigError(f"{where}{key}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if hint is str:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return ",".join(value)
        if not isinstance(value, str):
            raise OGPSAConfigError(f"{where}{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"unsupported annotation {hint!r} for {key}")  # a bug in this module, not in input


def split_ogpsa_args(args: dict[str, Any], where: str = "") -> tuple[OGPSAArguments | None, dict[str, Any]]:
    """Split a LLaMA-Factory argument dict into (OGPSA settings or None, the stock arguments).

    The stock arguments get the mapped stage (`ogpsa_sft` -> `sft`). Raises `OGPSAConfigError`
    for unknown `ogpsa_*` keys, wrong types, out-of-range values, a missing reference, or
    `ogpsa_*` keys on a stage that cannot use them. `where` prefixes messages (e.g. a file name).
    """
    stage = args.get("stage", "sft")
    ours = {k: v for k, v in args.items() if isinstance(k, str) and k.startswith(PREFIX)}
    rest = {k: v for k, v in args.items() if k not in ours}
    if stage not in OGPSA_STAGES:
        if ours:
            raise OGPSAConfigError(
                f"{where}{', '.join(sorted(ours))}: ogpsa_* keys need `stage: ogpsa_sft` or `stage: ogpsa_dpo`, "
                f"but the stage is {stage!r}"
            )
        return None, args
    osf_keys = {k: ours.pop(k) for k in list(ours) if k.startswith(OSF_PREFIX)}
    known = {f.name for f in user_fields()}
    unknown = sorted(set(ours) - known)
    if unknown:
        raise OGPSAConfigError(f"{where}{', '.join(unknown)}: unknown OGPSA key(s); known keys: {sorted(known)}")
    values = {k: _check_type(k, v, None, where) for k, v in ours.items()}
    method = values.get("ogpsa_method", "gradient_span")
    if osf_keys and method != "osf":
        raise OGPSAConfigError(f"{where}{', '.join(sorted(osf_keys))}: not used by ogpsa_method={method}")
    osf = None
    if method == "osf":
        foreign = sorted(k for k in values if k not in OSF_SHARED_KEYS)
        if foreign:
            raise OGPSAConfigError(f"{where}{', '.join(foreign)}: not used by ogpsa_method=osf (it needs no "
                                   "reference data and builds nothing)")
        try:
            osf = parse_osf_args(osf_keys)
        except ValueError as e:
            raise OGPSAConfigError(f"{where}{e}") from None
    used = set(METHOD_KEYS.get(method, ()))
    foreign = sorted({k for keys in METHOD_KEYS.values() for k in keys if k in values and k not in used})
    if foreign:
        raise OGPSAConfigError(f"{where}{', '.join(foreign)}: not used by ogpsa_method={method}")
    # alpha has a default, so only the keys given tell whether both thresholds were asked for
    if "ogpsa_null_alpha" in values and values.get("ogpsa_null_energy") is not None:
        raise OGPSAConfigError(
            f"{where}ogpsa_null_alpha, ogpsa_null_energy: give one or the other (a ratio to the largest "
            "eigenvalue, or a fraction of the inputs' energy to protect)"
        )
    if values.get("ogpsa_reference_rotation", 1) > 1 and "ogpsa_keep_previous" in values:
        raise OGPSAConfigError(
            f"{where}ogpsa_keep_previous: not used with ogpsa_reference_rotation > 1 (the subspace keeps every "
            "share's latest gradient, and a share's older one is replaced); remove one of the two"
        )
    settings = OGPSAArguments(**values, stage=stage, osf=osf)
    validate(settings, where)
    rest["stage"] = OGPSA_STAGES[stage]
    return settings, rest


def validate(settings: OGPSAArguments, where: str = "") -> None:
    if settings.ogpsa_method == "osf":
        return  # no reference data; its own keys were checked by parse_osf_args
    if not settings.reference_names:
        raise OGPSAConfigError(
            f"{where}ogpsa_reference: required for stage {settings.stage} "
            "(comma-separated dataset names from dataset_info.json, e.g. gsm8k_ref,alpaca_ref,hhh_ref)"
        )
    if len(set(settings.reference_names)) != len(settings.reference_names):
        raise OGPSAConfigError(f"{where}ogpsa_reference: a dataset is named twice: {settings.ogpsa_reference!r}")
    if settings.ogpsa_reference_samples < 1:
        raise OGPSAConfigError(f"{where}ogpsa_reference_samples: must be >= 1, got {settings.ogpsa_reference_samples}")
    if settings.ogpsa_refresh_steps is not None and settings.ogpsa_refresh_steps < 0:
        raise OGPSAConfigError(f"{where}ogpsa_refresh_steps: must be >= 0, got {settings.ogpsa_refresh_steps}")
    if not 0.0 <= settings.ogpsa_null_alpha <= 1.0:
        raise OGPSAConfigError(f"{where}ogpsa_null_alpha: must be in [0, 1], got {settings.ogpsa_null_alpha}")
    if settings.ogpsa_null_energy is not None and not 0.0 <= settings.ogpsa_null_energy <= 1.0:
        raise OGPSAConfigError(f"{where}ogpsa_null_energy: must be in [0, 1], got {settings.ogpsa_null_energy}")
    if settings.ogpsa_directions_per_set < 1:
        raise OGPSAConfigError(
            f"{where}ogpsa_directions_per_set: must be >= 1, got {settings.ogpsa_directions_per_set}"
        )
    if settings.ogpsa_directions_per_set > settings.ogpsa_reference_samples:
        raise OGPSAConfigError(
            f"{where}ogpsa_directions_per_set: {settings.ogpsa_directions_per_set} groups need at least as many "
            f"samples per set, but ogpsa_reference_samples is {settings.ogpsa_reference_samples}"
        )
    if settings.ogpsa_reference_rotation < 1:
        raise OGPSAConfigError(
            f"{where}ogpsa_reference_rotation: must be >= 1, got {settings.ogpsa_reference_rotation}"
        )
    if settings.ogpsa_reference_rotation * settings.ogpsa_directions_per_set > settings.ogpsa_reference_samples:
        raise OGPSAConfigError(
            f"{where}ogpsa_reference_rotation: {settings.ogpsa_reference_rotation} shares x "
            f"{settings.ogpsa_directions_per_set} directions per set need at least as many samples per set, but "
            f"ogpsa_reference_samples is {settings.ogpsa_reference_samples}"
        )
    if not settings.ogpsa_null_layers.strip():
        raise OGPSAConfigError(f"{where}ogpsa_null_layers: 'mlp', 'all_linear' or comma-separated layer names")
    if settings.ogpsa_reference_batch_size is not None and settings.ogpsa_reference_batch_size < 1:
        raise OGPSAConfigError(
            f"{where}ogpsa_reference_batch_size: must be >= 1, got {settings.ogpsa_reference_batch_size}"
        )



# How the README's settings table shows a default that is not the field's literal value.
_DEFAULT_DOCS = {
    "ogpsa_reference": "(required)",
    "ogpsa_refresh_steps": "5; 0 with `null_space`",
    "ogpsa_reference_batch_size": "`per_device_train_batch_size`",
    "ogpsa_null_energy": "unset (`ogpsa_null_alpha` applies)",
}


def settings_markdown() -> str:
    """The README's settings table, made from the fields' help so the two cannot drift apart."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in user_fields():
        default = _DEFAULT_DOCS.get(f.name)
        if default is None:
            default = f"`{f.default}`"
        meaning = " ".join(f.metadata.get("help", "").split()).replace("|", "\\|")
        rows.append(f"| `{f.name}` | {default} | {meaning} |")
    return "\n".join(rows)
