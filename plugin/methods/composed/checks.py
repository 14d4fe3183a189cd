"""What `ogpsa_method: gradient_span+null_space` refuses before launch (settings and arguments only).

It runs where both of its methods run: one process and DDP. The null space's build reads whole
weight rows (W P) and the composition projects whole reference-gradient rows through it, so ZeRO's
flat partitions and FSDP2's shards are refused here, with one line, before anything loads; so is
DoRA, whose magnitude vector rescales every output, on the reference inputs too. Unlike the null
space alone, LoRA may rebuild (`ogpsa_refresh_steps > 0`): the composition builds its null spaces
once per stage and rebuilds only the span, which never moves an adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...settings import COMPOSED, OGPSAArguments, OGPSAConfigError


def check_arguments(get: Callable[[str], Any], settings: OGPSAArguments, where: str = "") -> None:
    if settings.ogpsa_method != COMPOSED:
        return
    config, fsdp = get("deepspeed"), get("fsdp")
    if config or fsdp:
        raise OGPSAConfigError(
            f"{where}{'deepspeed' if config else 'fsdp'}: ogpsa_method={COMPOSED} runs on one process or DDP "
            "(what both of its methods support: the null space needs whole weight rows, which ZeRO's and FSDP2's "
            "shards cut)"
        )
    if (get("finetuning_type") or "lora") == "lora" and get("use_dora"):
        raise OGPSAConfigError(
            f"{where}use_dora: ogpsa_method={COMPOSED} does not support DoRA (its magnitude vector rescales every "
            "output, on the reference inputs too); use plain LoRA"
        )
