"""`ogpsa_method: osf` inside LLaMA-Factory: wrap the trained model with PEFT's OSF, save it merged.

Two wraps, applied once by `tuner.patch_tuner` (they act only while an OSF stage's callback is
pending, so every other run, the DPO reference model included, is untouched):

- `llamafactory.model.loader.init_adapter`: after LLaMA-Factory's own full fine-tuning set-up (its
  float32 upcast included), a trainable model is wrapped with `get_peft_model(model, OSFConfig(...))`
  (`plugin.osf.wrap_model`), so the trainer, its optimizer and DDP see PEFT's model as they would a
  LoRA one. The reference model of a DPO stage is loaded with is_trainable=False and stays plain.
- `transformers.Trainer._save`: the stage's final save (into `output_dir` itself) writes the merged
  model, an ordinary Hugging Face folder (`model.safetensors`, config, tokenizer), which `ogpsa eval`,
  `ogpsa report`, weight averaging and the next stage of a pipeline load as any full fine-tuning
  result. Checkpoints (`checkpoint-N/`) keep PEFT's adapter format, which the trainer resumes from.

`training_defaults` sets one parsed argument as LLaMA-Factory sets it for LoRA.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ...plugin.osf import OSFCallback, is_osf_model, merged_state_dict, wrap_model

PATCHED = "__ogpsa_patched__"


def patch_osf(pending: Callable[[], Any]) -> None:
    """Install both wraps (idempotent); `pending()` gives the callback of the stage now starting, or None."""
    import llamafactory.model.loader as loader
    from transformers import Trainer

    if not getattr(loader.init_adapter, PATCHED, False):
        original_init_adapter = loader.init_adapter

        def init_adapter(config, model, model_args, finetuning_args, is_trainable):
            model = original_init_adapter(config, model, model_args, finetuning_args, is_trainable)
            callback = pending()
            if is_trainable and isinstance(callback, OSFCallback):
                model = wrap_model(model, callback.settings.osf)
            return model

        setattr(init_adapter, PATCHED, True)
        loader.init_adapter = init_adapter

    if not getattr(Trainer._save, PATCHED, False):
        original_save = Trainer._save

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            final = os.path.abspath(output_dir or self.args.output_dir) == os.path.abspath(self.args.output_dir)
            if not (final and is_osf_model(self.model)):
                return original_save(self, output_dir, state_dict)
            peft_model = self.model
            merged = merged_state_dict(peft_model)
            # the trainer's own save of a plain model (weights, config, tokenizer, training args),
            # with the merged weights under the names the model had before it was wrapped
            self.model = peft_model.get_base_model()
            try:
                return original_save(self, output_dir, merged)
            finally:
                self.model = peft_model

        setattr(_save, PATCHED, True)
        _save.__doc__ = original_save.__doc__
        Trainer._save = _save


def training_defaults(training_args) -> None:
    """DDP without searching for unused parameters, unless the user chose: LLaMA-Factory sets this for
    LoRA only, and the trainer searches for any model that is not a PreTrainedModel (a PeftModel), which
    under LLaMA-Factory's reentrant gradient checkpointing marks each OSF factor ready twice and stops
    the first backward. Every wrapped layer runs in every forward, so none is unused."""
    if getattr(training_args, "ddp_find_unused_parameters", False) is None:
        training_args.ddp_find_unused_parameters = False
