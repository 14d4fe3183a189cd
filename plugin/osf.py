"""`ogpsa_method: osf`: PEFT's orthogonal subspace fine-tuning inside an `ogpsa_sft` / `ogpsa_dpo` stage.

PEFT (0.18) ships OSF as a tuner: `get_peft_model(model, OSFConfig(...))` replaces each targeted
linear layer by `W = U_high S_high V_high + U_low S_low V_low`, the SVD of its weight split at the
kept rank; the top part is a frozen buffer, the low factors train, and a gradient hook on U_low and
V_low removes their components along U_high and V_high. Everything else of the model is frozen.

What this module adds to PEFT's own usage:

- `wrap_model`: the PEFT call, from the stage's `ogpsa_osf_*` settings (`osf_settings.py`).
- `OSFCallback`, with `ogpsa_target: update` (the package default): after each optimizer step,
  U_low <- U_low - U_high U_high^T U_low and V_low <- V_low - V_low V_high^T V_high. PEFT's hook makes
  the gradient orthogonal, but Adam rescales it per coordinate, so its step leaves the
  complement: U_high^T (W_after - W_before) is then not 0, and the top singular
  directions drift. With the step projected, U_high^T dW = 0 and dW V_high^T = 0 exactly (to float
  rounding) under any optimizer, as the gradient-span method's `update` target does for its
  subspace. `ogpsa_target: gradient` leaves PEFT's behaviour alone (exact under SGD only).
  It also logs `ogpsa/osf_step_removed` (the norm the projection took off the step).
- `merged_state_dict`: the trained model as plain weights (each wrapped layer's reconstructed
  `weight`, under its original name), which the stage saves as its final output so that
  `ogpsa eval`, `ogpsa report`, weight averaging and the next stage of a pipeline read an ordinary
  Hugging Face folder. Checkpoints stay PEFT's adapter format (the trainer resumes from them).

The LLaMA-Factory side (wrapping at model load, the final save) is in
`pipelines/integration/osf.py`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from llamafactory.extras.logging import get_logger
from transformers import TrainerCallback

from .engines import accelerate_engine
from .files import discard_if_created_empty
from .osf_settings import OSFArguments, osf_config_kwargs
from .preflight import preflight
from .settings import OGPSAArguments, OGPSAConfigError

METRIC = "ogpsa/osf_step_removed"
logger = get_logger("llamafactory.ogpsa")  # LLaMA-Factory's format and running_log.txt, as callback.py


def osf_layers(model: torch.nn.Module) -> dict[str, Any]:
    """{module name: PEFT OSF layer} of a model (a PeftModel or anything holding OSF layers)."""
    from peft.tuners.osf.layer import OSFLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, OSFLayer)}


def is_osf_model(model: Any) -> bool:
    from peft import PeftModel, PeftType

    return isinstance(model, PeftModel) and any(
        c.peft_type == PeftType.OSF for c in getattr(model, "peft_config", {}).values())


def wrap_model(model: torch.nn.Module, settings: OSFArguments):
    """PEFT's own usage: `get_peft_model(model, OSFConfig(...))`. Refuses a wrap that caught no layer."""
    from peft import OSFConfig, get_peft_model

    peft_model = get_peft_model(model, OSFConfig(**osf_config_kwargs(settings)))
    layers = osf_layers(peft_model)
    if not layers:
        raise OGPSAConfigError(
            f"ogpsa_osf_target_modules: {settings.ogpsa_osf_target_modules or 'PEFT’s default'} matched no linear "
            "layer of the model")
    kept = sorted({layer.effective_rank[adapter_of(layer)] for layer in layers.values()})
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info_rank0(f"ogpsa: PEFT's OSF wraps {len(layers)} linear layers (top singular directions kept per layer: "
                      f"{', '.join(map(str, kept))}); trainable parameters: {trainable:,}; everything else is frozen")
    return peft_model


def adapter_of(layer) -> str:
    (name,) = [a for a in layer.active_adapters if a in layer.osf_svd_params]
    return name


@torch.no_grad()
def project_low_factors(model: torch.nn.Module) -> float:
    """Put every OSF layer's U_low / V_low back into the complement of U_high / V_high; return the
    Frobenius norm removed (over all layers)."""
    removed = 0.0
    for layer in osf_layers(model).values():
        adapter = adapter_of(layer)
        low = layer.osf_svd_params[adapter]
        u_high, v_high = layer._osf_U_high[adapter], layer._osf_V_high[adapter]
        if u_high.numel() == 0 or low["U_low"].numel() == 0:
            continue
        du = u_high @ (u_high.T @ low["U_low"])  # (out, low) component along the kept left directions
        dv = (low["V_low"] @ v_high.T) @ v_high  # (low, in) component along the kept right directions
        low["U_low"].sub_(du)
        low["V_low"].sub_(dv)
        removed += float(du.float().pow(2).sum() + dv.float().pow(2).sum())
    return math.sqrt(removed)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the unwrapped model with each OSF layer merged into a plain `weight` (and its
    `bias`), under the names the model had before wrapping; the model itself is left as it is."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = osf_layers(base)
    state = base.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
    for name, layer in layers.items():
        base_layer = layer.get_base_layer()
        weight = layer._reconstruct_weight(adapter_of(layer))
        out[f"{name}.weight"] = weight.detach().to(base_layer.weight.dtype).contiguous()
        if getattr(base_layer, "bias", None) is not None:
            out[f"{name}.bias"] = base_layer.bias.detach()
    return out


def _getter(model_args, data_args, training_args, finetuning_args):
    """`get(key)` over LLaMA-Factory's parsed arguments, as `preflight` reads them."""

    def get(key):
        if key == "dataset_dir":
            return data_args.dataset_dir
        for args in (training_args, finetuning_args, model_args):
            if hasattr(args, key):
                return getattr(args, key)
        return None

    return get


class OSFCallback(TrainerCallback):
    """The OSF stage's callback: holds the settings the model is wrapped with, checks the parsed
    arguments (`bind`), projects each optimizer step (`ogpsa_target: update`) and logs it."""

    def __init__(self, settings: OGPSAArguments):
        if settings.ogpsa_method != "osf" or settings.osf is None:
            raise ValueError("OSFCallback: the settings are not for ogpsa_method=osf")
        self.settings = settings
        self.training_args = None
        self._output_existed = True
        self._removed: list[float] = []

    def bind(self, model_args, data_args, training_args, finetuning_args, *_ignored) -> None:
        """Receive LLaMA-Factory's parsed arguments; refuse what OSF cannot run with before loading."""
        self.training_args = training_args
        self._output_existed = os.path.exists(training_args.output_dir)
        preflight(_getter(model_args, data_args, training_args, finetuning_args), settings=self.settings)

    def discard_empty_output_dir(self) -> None:
        """After a failed start: remove output_dir if this run created it and it is still empty."""
        discard_if_created_empty(getattr(self.training_args, "output_dir", None), self._output_existed)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not is_osf_model(model) or not osf_layers(model):
            raise OGPSAConfigError("ogpsa_method=osf: the trainer's model was not wrapped with PEFT's OSF (is the "
                                   "ogpsa hook armed? run through llamafactory-cli or ogpsa train)")
        engine = accelerate_engine()  # an engine enabled outside the YAML (accelerate config, environment)
        if engine in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
            raise OGPSAConfigError(f"{engine.lower()}: ogpsa_method=osf runs on one process or DDP")

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.settings.ogpsa_target == "update":
            self._removed.append(project_low_factors(model))

    def pop_log_metrics(self) -> dict[str, float]:
        if not self._removed:
            return {}
        out = {METRIC: max(self._removed)}
        self._removed.clear()
        return out
