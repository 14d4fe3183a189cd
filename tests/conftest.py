"""Shared fixtures: the tiny offline model and toy data, and a runner for `llamafactory-cli train`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DISABLE_VERSION_CHECK": "1",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
ENV["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # torchrun for FORCE_TORCHRUN=1
os.environ.update(ENV)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """{'model': dir, 'data': dir}: a random tiny Qwen2 + tokenizer and the toy datasets."""
    from ogpsa.data_prep import tiny as tiny_assets

    return tiny_assets.build(tmp_path_factory.mktemp("tiny"))


def base_config(tiny: dict[str, str], out: Path, **overrides) -> dict:
    """A small full fine-tuning config on the toy data (plain SGD, constant LR, no saving)."""
    cfg = {
        "model_name_or_path": tiny["model"],
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "dataset": "toy_safety_sft",
        "dataset_dir": tiny["data"],
        "template": "qwen",
        "cutoff_len": 128,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant",
        "num_train_epochs": 1,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": 42,
        "preprocessing_num_workers": None,
        "dataloader_num_workers": 0,
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def ogpsa_keys(**overrides) -> dict:
    keys = {
        "stage": "ogpsa_sft",
        "ogpsa_reference": "toy_math_ref,toy_general_ref,toy_hhh_ref",
        "ogpsa_reference_samples": 16,
        "ogpsa_refresh_steps": 1,
    }
    keys.update(overrides)
    return keys


def run_cli(config: dict, tmp: Path, *extra: str, env: dict | None = None, cli: str = "llamafactory-cli",
            check: bool = True) -> subprocess.CompletedProcess:
    """Write `config` as YAML and run `<cli> train it.yaml [extra...]` in a subprocess."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.run(
        [str(BIN / cli), "train", str(path), *extra],
        env={**os.environ, **ENV, **(env or {})},
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cli} train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def log_history(out: Path) -> list[dict]:
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


def ogpsa_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "ogpsa_log.jsonl").read_text().splitlines()]


def load_state(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def tokenized_references(model_dir: str, tiny: dict[str, str], names: list[str], samples: int = 10_000):
    """(sets, collator factory) of each dataset's first `samples` rows, tokenised by LLaMA-Factory exactly
    as training does; `collator(model)` pads like the reference batches."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from ogpsa.plugin.reference import tokenize_reference_sets

    probe = Path(model_dir) / "_probe"
    model_args, data_args, training_args, _, _ = get_train_args(base_config(tiny, probe, model_name_or_path=model_dir))
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    sets = tokenize_reference_sets(names, samples, template, tokenizer, None, model_args, data_args, training_args)
    shutil.rmtree(probe, ignore_errors=True)

    def collator(model):
        return SFTDataCollatorWith4DAttentionMask(template=template, model=model, label_pad_token_id=-100,
                                                  tokenizer=tokenizer)

    return sets, collator


def reference_losses(model_dir: str, tiny: dict[str, str], names: list[str], adapter: str | None = None,
                     samples: int = 10_000) -> dict[str, float]:
    """Mean answer-token NLL of each dataset's first `samples` rows, tokenised by LLaMA-Factory exactly
    as training does (of `model_dir` with the LoRA adapter in `adapter` merged, when given)."""
    import torch
    from transformers import AutoModelForCausalLM

    sets, make_collator = tokenized_references(model_dir, tiny, names, samples)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    collator = make_collator(model)
    out = {}
    with torch.no_grad():
        for ref in sets:
            total, count = 0.0, 0
            for i in range(0, len(ref.features), 8):
                batch = collator([dict(f) for f in ref.features[i : i + 8]])
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += float(model(**batch).loss) * n
                count += n
            out[ref.name] = total / count
    return out
