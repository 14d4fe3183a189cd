"""Everything that touches LLaMA-Factory's internals, in one place (the layer above `pipelines`).

- `hook`: the post-import hook (`arm()`), armed at interpreter start-up by the installed
  `ogpsa_activate.pth` through `autoload`; it applies the patches below when LLaMA-Factory
  imports the module each one wraps.
- `tuner`: `llamafactory.train.tuner` (the `ogpsa_sft` / `ogpsa_dpo` stages, the callback) and
  `transformers.Trainer.log` (the callback's metrics in the trainer's log).
- `launcher`: `llamafactory.launcher` (recipes, checks before launch, the torchrun worker).
- `webui`: `llamafactory.webui.runner` and `llamafactory.webui.components.train` (the stages and
  the OGPSA accordion in LlamaBoard).
- `osf`: `llamafactory.model.loader.init_adapter` and `transformers.Trainer._save` for `ogpsa_method:
  osf` (PEFT's OSF wraps the trained model at load; the final save writes it merged), installed by `tuner`.
- `entry`: the processes this package starts: `ogpsa train` and each torchrun rank
  (`worker/ogpsa_lf_worker.py`, alone in its folder because torchrun puts that folder on sys.path).

Import-light on purpose: nothing here imports torch or llamafactory at import time.
"""
