"""Which training engine a run uses, and whether OGPSA supports it.

Checked twice: before launch from the arguments (`check_arguments`: one line, exit 2, nothing
written), and at train start from the objects that actually run (`detect`), which also catches
engines enabled outside the YAML (an `accelerate launch --config_file`, ACCELERATE_USE_DEEPSPEED or
ACCELERATE_USE_FSDP in the environment).

Supported: one process, DDP, DeepSpeed ZeRO-1/2/3 (optimizer and parameters on the accelerator),
FSDP2. Refused, each with its reason: ZeRO stage 0 (use DDP), ZeRO offload, FSDP2 CPU offload,
DoRA under the null-space method, DeepSpeed's bf16
optimizer (ZeRO-1 with bf16 and fp32 gradient accumulation), partitions over a process group
narrower than the world (MiCS, expert, sequence or tensor parallelism), FSDP1, `global`
granularity under ZeRO (its groups are stepped one at a time), `pure_bf16` with
`ogpsa_target: update`, and LLaMA-Factory paths that bypass the HF trainer (`use_mca`,
`use_hyper_parallel`, USE_V1).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from .dist import world_size
from .osf_settings import check_osf_engine
from .settings import OGPSAArguments, OGPSAConfigError
from .sharding import FSDP2Layout, Replicated, ShardLayout, Zero3Layout, ZeroLayout

FSDP_OFFLOAD_REFUSED = ("CPU offload is not supported by OGPSA stages (the basis and the projection live beside the "
                        "shards on the accelerator)")
UNSUPPORTED_FLAGS = ("use_badam", "use_galore", "use_apollo", "use_muon", "use_adam_mini", "use_mca",
                     "use_hyper_parallel")


def check_arguments(get: Callable[[str], Any], settings: OGPSAArguments, where: str = "") -> None:
    """Refuse what cannot work, from the arguments alone. `get(key)` reads a LLaMA-Factory argument
    (from the YAML dict before launch, or from the parsed dataclasses)."""
    if os.environ.get("USE_V1", "").lower() in ("1", "true", "y", "yes"):
        raise OGPSAConfigError(f"{where}USE_V1: OGPSA stages run on LLaMA-Factory's v0 trainer; unset USE_V1")
    for flag in UNSUPPORTED_FLAGS:
        if get(flag):
            raise OGPSAConfigError(f"{where}{flag}: not supported together with OGPSA stages")
    if get("pure_bf16") and settings.ogpsa_target == "update":
        raise OGPSAConfigError(
            f"{where}pure_bf16: bf16 weights cannot resolve a small step, so ogpsa_target=update cannot remove "
            "its in-span part; keep float32 master weights (bf16: true, or DeepSpeed/FSDP2 mixed precision) "
            "or set ogpsa_target: gradient"
        )
    if settings.ogpsa_method == "osf":
        try:
            check_osf_engine(get)
        except ValueError as e:
            raise OGPSAConfigError(f"{where}{e}") from None
        return
    config, fsdp = get("deepspeed"), get("fsdp")
    if settings.ogpsa_method == "null_space":
        _check_null_space_tuning(get, settings, where)
    if config:
        _check_deepspeed(_load_deepspeed_config(config, where), settings, where, get)
    if fsdp:
        fsdp_config = _as_dict(get("fsdp_config"))
        version = fsdp_config.get("version", fsdp_config.get("fsdp_version", 1))
        if str(version) != "2":
            raise OGPSAConfigError(
                f"{where}fsdp: OGPSA supports FSDP2 only (fsdp_config: {{version: 2}}); FSDP1's flat parameters "
                "are not supported"
            )
        words = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, (list, tuple)) else []
        if "offload" in words:  # the HF option that sets accelerate's cpu_offload
            raise OGPSAConfigError(f"{where}fsdp: {FSDP_OFFLOAD_REFUSED}; remove 'offload' from fsdp")


def _check_null_space_tuning(get: Callable[[str], Any], settings: OGPSAArguments, where: str) -> None:
    """LoRA variants the null-space constraint cannot hold (A <- A P keeps B A x on the reference inputs)."""
    if (get("finetuning_type") or "lora") != "lora":  # LLaMA-Factory's default is LoRA
        return
    if get("use_dora"):
        raise OGPSAConfigError(
            f"{where}use_dora: ogpsa_method=null_space does not support DoRA (its magnitude vector rescales every "
            "output, on the reference inputs too); use plain LoRA"
        )


def _as_dict(value: Any) -> dict:
    if isinstance(value, str) and value.endswith(".json") and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return json.load(f)
    return value if isinstance(value, dict) else {}


def _load_deepspeed_config(config: Any, where: str) -> dict:
    if isinstance(config, dict):
        return config
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise OGPSAConfigError(f"{where}deepspeed: {config} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise OGPSAConfigError(f"{where}deepspeed: {config} is not a readable JSON file ({e})") from None


def _enabled(config: dict, keys: tuple[str, ...], flags: tuple[str, ...], get: Callable[[str], Any]) -> bool:
    """Whether a DeepSpeed precision section is on: `enabled: true`, or `"auto"`, which the HF trainer
    fills from its own flags (`bf16`/`bf16_full_eval`, `fp16`/`fp16_full_eval`)."""
    section = next((config[k] for k in keys if isinstance(config.get(k), dict)), {})
    enabled = section.get("enabled", False)
    if enabled == "auto":
        return any(bool(get(f)) for f in flags)
    return enabled is True or str(enabled).lower() == "true"


def _check_deepspeed(config: dict, settings: OGPSAArguments, where: str, get: Callable[[str], Any]) -> None:
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    if stage not in (1, 2, 3):
        raise OGPSAConfigError(
            f"{where}deepspeed: ZeRO stage {stage} is not supported by OGPSA stages; use ZeRO-1/2/3, or DDP "
            "without a deepspeed config"
        )
    # DeepSpeed swaps ZeRO-1 for its BF16_Optimizer when the weights are bf16 and gradients accumulate
    # in float32 (DeepSpeedEngine._do_optimizer_sanity_check); that optimizer has no ZeRO partitions to
    # project, so it is refused here, from the same config keys, before the model loads.
    accum = str((config.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    if (stage == 1 and accum in ("fp32", "float32", "float", "torch.float32")
            and _enabled(config, ("bf16", "bfloat16"), ("bf16", "bf16_full_eval"), get)
            and not _enabled(config, ("fp16",), ("fp16", "fp16_full_eval"), get)):
        raise OGPSAConfigError(
            f"{where}deepspeed: ZeRO-1 with bf16 and data_types.grad_accum_dtype {accum!r} runs DeepSpeed's "
            "BF16_Optimizer, which OGPSA stages do not support; use ZeRO-2/3, or drop grad_accum_dtype"
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise OGPSAConfigError(
                f"{where}deepspeed: zero_optimization.{key} (device {device!r}) is not supported by OGPSA stages: "
                "the basis and the projection live beside the partitions on the accelerator"
            )
    if settings.ogpsa_granularity == "global":
        raise OGPSAConfigError(
            f"{where}ogpsa_granularity: 'global' is not supported under DeepSpeed ZeRO (the engine steps its "
            "parameter groups one at a time); use 'tensor'"
        )


def _unwrap_optimizers(optimizer) -> list:
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        chain.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def accelerate_engine() -> str | None:
    """accelerate's distributed type (DEEPSPEED, FSDP, MULTI_GPU, ...), or None before accelerate is set up."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return None
    if not AcceleratorState._shared_state:
        return None
    return str(getattr(AcceleratorState(), "distributed_type", "")).split(".")[-1]


def _accelerate_fsdp_offloads() -> bool:
    """Whether accelerate's FSDP plugin offloads parameters to the CPU (FSDP2: a CPUOffloadPolicy)."""
    if accelerate_engine() != "FSDP":
        return False
    from accelerate.state import AcceleratorState

    offload = getattr(getattr(AcceleratorState(), "fsdp_plugin", None), "cpu_offload", None)
    return type(offload).__name__ == "CPUOffloadPolicy" or bool(getattr(offload, "offload_params", False))


def detect(model: torch.nn.Module, optimizer, params: list[torch.nn.Parameter],
           settings: OGPSAArguments) -> ShardLayout:
    """The layout of `params` under the engine that actually runs; refuses unsupported engines."""
    if "deepspeed" in sys.modules:
        layout = _deepspeed_layout(optimizer, params, settings)
        if layout is not None:
            return _check_method(layout, settings)
    if accelerate_engine() == "DEEPSPEED":
        raise OGPSAConfigError("deepspeed: this DeepSpeed set-up (no ZeRO-1/2/3 optimizer found) is not supported "
                               "by OGPSA stages; use ZeRO-1/2/3 or DDP")
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()) or any(
        type(p).__name__ == "FlatParameter" for p in model.parameters()
    ):
        raise OGPSAConfigError("fsdp: OGPSA supports FSDP2 only (fsdp_config: {version: 2}); FSDP1 is not supported")
    if any(type(p).__name__ == "DTensor" for p in params):
        if _accelerate_fsdp_offloads():  # e.g. fsdp_offload_params in an accelerate config file
            raise OGPSAConfigError(f"fsdp: {FSDP_OFFLOAD_REFUSED}")
        layout = _fsdp2_layout(params)
    else:
        layout = Replicated(params)
    return _check_method(layout, settings)


def _check_method(layout: ShardLayout, settings: OGPSAArguments) -> ShardLayout:
    return layout


def check_partition_groups(engine: str, sizes: list[int]) -> None:
    """Refuse partitions taken over process groups narrower than the world.

    The projection sums its inner products, and a rebuild its reference gradients and token
    counts, over the whole world; if ranks partition within smaller groups (DeepSpeed's MiCS,
    expert data-parallel groups, sequence or tensor parallelism) each piece would be counted once
    per replica of the group, silently scaling every coefficient.
    """
    world = world_size()
    narrower = sorted({s for s in sizes if s != world})
    if narrower:
        raise OGPSAConfigError(
            f"{engine}: the optimizer partitions over process groups of {', '.join(map(str, narrower))} ranks, not all "
            f"{world} (MiCS, expert, sequence or tensor parallelism); OGPSA stages reduce over the whole world and "
            "support plain data parallelism only"
        )


def _fsdp2_layout(params) -> ShardLayout:
    from torch.distributed.tensor import DTensor, Shard

    for p in params:
        if not isinstance(p, DTensor) or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise OGPSAConfigError(
                "fsdp: OGPSA supports FSDP2 with every trainable parameter sharded on dim 0 over one mesh "
                "dimension (no HSDP, tensor parallelism or mixed replicated parameters)"
            )
    check_partition_groups("fsdp", [p.device_mesh.size() for p in params])
    return FSDP2Layout(params)


def _deepspeed_layout(optimizer, params, settings: OGPSAArguments) -> ShardLayout | None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    chain = _unwrap_optimizers(optimizer)
    zero = next((o for o in chain if isinstance(o, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))), None)
    if zero is None:
        names = [type(o).__name__ for o in chain if type(o).__module__.startswith("deepspeed")]
        if names:
            raise OGPSAConfigError(
                f"deepspeed: the {names[0]} optimizer is not supported by OGPSA stages (ZeRO-1 with bf16 and fp32 "
                "gradient accumulation, or ZeRO stage 0); use ZeRO-2/3, or DDP"
            )
        return None
    if settings.ogpsa_granularity == "global":
        raise OGPSAConfigError("ogpsa_granularity: 'global' is not supported under DeepSpeed ZeRO; use 'tensor'")
    offload = getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False) or getattr(
        zero, "offload_param", False)
    if offload:
        raise OGPSAConfigError("deepspeed: ZeRO offload is not supported by OGPSA stages")
    try:
        if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
            groups = [zero.dp_process_group, *getattr(zero, "sub_group_process_groups", [])]
        else:
            groups = list(zero.real_dp_process_group)
        check_partition_groups("deepspeed", [torch.distributed.get_world_size(group=g) for g in groups])
        if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
            return Zero3Layout(params, zero)
        return ZeroLayout(params, zero, 2 if zero.partition_gradients else 1)
    except AttributeError as e:  # a release whose optimizer keeps its partitions under other names
        import deepspeed

        raise OGPSAConfigError(
            f"deepspeed: version {deepspeed.__version__} lays out its ZeRO partitions in a way OGPSA does not know "
            f"({e}); install deepspeed==0.19.8 (constraints.txt)"
        ) from None
