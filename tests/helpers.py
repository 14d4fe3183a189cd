"""What the tests share: the offline environment, configs of the tiny model and toy data, a runner for
`llamafactory-cli train`, readers of what a run wrote, and reference-set tools computed independently of
the plugin's own code paths.

A plain module, not a conftest: test files import it (`from helpers import ...`), and so can the worker
scripts torchrun starts (`tests/` is the script's own folder, first on their sys.path). conftest.py keeps
the fixtures and hooks. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
TORCHRUN = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}  # run_cli(..., env=TORCHRUN): 2 processes, CPU

REFS = ["toy_math_ref", "toy_general_ref", "toy_hhh_ref"]  # the toy reference sets (ogpsa_keys' default)

# The null-space tests' tiny set-up: 4 reference samples per set, and an alpha that leaves about half of
# every input space free (at NSPO's 5e-5 the tiny model's ~900 reference tokens fill every space).
SAMPLES = 4
ALPHA = 0.05
MLP = [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")]

# Plain baselines several tests compare against, trained once per test run by the `trained` fixture:
# AdamW, 3 steps, clipping at 1.0 (what an OGPSA mode must leave bitwise unchanged) and AdamW, 4 steps,
# no clipping (what a constraint's preservation is measured against).
PLAIN_ADAMW_3 = {"optim": "adamw_torch", "learning_rate": 1e-3, "max_steps": 3, "max_grad_norm": 1.0}
PLAIN_ADAMW_4 = {"optim": "adamw_torch", "learning_rate": 1e-3, "max_steps": 4, "max_grad_norm": 0.0}


def base_config(tiny: dict[str, str], out: Path | None, **overrides) -> dict:
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
        "ogpsa_reference": ",".join(REFS),
        "ogpsa_reference_samples": 16,
        "ogpsa_refresh_steps": 1,
    }
    keys.update(overrides)
    return keys


def null_keys(**overrides) -> dict:
    """ogpsa_keys of the null-space method at the tests' SAMPLES and ALPHA, built once."""
    keys = {"ogpsa_method": "null_space", "ogpsa_reference_samples": SAMPLES, "ogpsa_null_alpha": ALPHA,
            "ogpsa_refresh_steps": 0}
    return ogpsa_keys(**{**keys, **overrides})


def deepspeed_config(stage: int) -> dict:
    """The minimal DeepSpeed config that runs on CPU (`overlap_comm` off), as recipes/ds_z3_config.json."""
    zero = {"stage": stage, "overlap_comm": False}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def run_cli(config: dict, tmp: Path, *extra: str, env: dict | None = None, cli: str = "llamafactory-cli",
            check: bool = True) -> subprocess.CompletedProcess:
    """Write `config` as YAML and run `<cli> train it.yaml [extra...]` in a subprocess."""
    import yaml

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


def run_worker(script: str, *args: str, cwd: Path) -> dict:
    """Run `tests/<script> ARGS... REPORT` on 2 CPU processes with torchrun and return the JSON report
    rank 0 wrote to REPORT (`cwd/report.json`)."""
    report = Path(cwd) / "report.json"
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(Path(__file__).with_name(script)),
         *args, str(report)],
        env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600, cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


def assert_refused(proc: subprocess.CompletedProcess, message: str, out: Path) -> str:
    """The settings-error contract of a process: exit 2, exactly one `ogpsa: error:` line holding
    `message`, no traceback, and `out` (the run's output_dir) not created. Returns the line."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ogpsa: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and not Path(out).exists()
    return errors[0]


def log_history(out: Path) -> list[dict]:
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


def ogpsa_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "ogpsa_log.jsonl").read_text().splitlines()]


def assert_projection_logged(out: Path, steps: int) -> list[dict]:
    """Every one of `steps` logged steps carries the projection's metrics (the projected gradient
    orthogonal to every reference gradient), every rebuild its time and set norms; the rebuild records."""
    history = [h for h in log_history(out) if "loss" in h]
    assert len(history) == steps
    for h in history:
        assert 0.0 < h["ogpsa/removed_fraction"] < 1.0
        for name in REFS:
            assert abs(h[f"ogpsa/cos_after/{name}"]) < 1e-4
            assert -1.0 <= h[f"ogpsa/cos/{name}"] <= 1.0
    rebuilds = [r for r in ogpsa_log(out) if r.get("event") == "rebuild"]
    for r in rebuilds:
        assert r["seconds"] > 0 and all(r[f"grad_norm/{n}"] > 0 for n in REFS)
    return rebuilds


def load_state(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts, over the tensors of `a`."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


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

    from ogpsa.plugin.reference import answer_nll

    sets, make_collator = tokenized_references(model_dir, tiny, names, samples)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    collator = make_collator(model)
    return {ref.name: answer_nll(model, ref, collator) for ref in sets}


def reference_inputs(tiny: dict, layers: list[str], names: list[str] = REFS, samples: int = SAMPLES):
    """Each layer's inputs (non-padding positions, float64 rows) on the reference sets, from the start
    model, one sample at a time (no padding at all)."""
    import torch
    from transformers import AutoModelForCausalLM

    sets, make_collator = tokenized_references(tiny["model"], tiny, names, samples)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32).eval()
    collator = make_collator(model)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    mask = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(
        lambda m, inp, out, n=n: rows[n].append(inp[0][mask["m"]].double())) for n in layers]
    with torch.no_grad():
        for ref in sets:
            for f in ref.features:
                batch = collator([dict(f)])
                mask["m"] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def null_energy(x, alpha: float) -> float:
    """Sum of the eigenvalues of X^T X at most alpha * the largest (what a null-space change may reach)."""
    import torch

    eig = torch.linalg.eigvalsh(x.T @ x).clamp_min(0)
    return float(eig[eig <= alpha * eig[-1]].sum())


def tiny_lm(vocab: int = 11, hidden: int = 6):
    """A pure-torch causal LM (embedding -> linear head) whose `.loss` is the mean next-token NLL over
    labels != -100, as Hugging Face models report it; no LLaMA-Factory, no tokenizer."""
    from types import SimpleNamespace

    import torch

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, hidden)
            self.head = torch.nn.Linear(hidden, vocab)

        def forward(self, input_ids, labels, attention_mask=None):
            logits = self.head(self.emb(input_ids))
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
            return SimpleNamespace(loss=loss)

    return TinyLM()


def mean_nll_gradient(model, params, features, collator) -> list:
    """The gradient of the mean answer-token NLL over `features` (tokenised rows), one sample at a time (no
    padding): the reference gradient of a set, share or group, computed apart from the plugin's batching."""
    for p in params:
        p.grad = None
    tokens = 0
    for f in features:
        batch = collator([dict(f)])
        n = int((batch["labels"][:, 1:] != -100).sum())
        (model(**batch).loss * n).backward()
        tokens += n
    grads = [p.grad.detach().clone() / tokens for p in params]
    for p in params:
        p.grad = None
    return grads


def cosine(a: list, b: list) -> float:
    """Whole-model cosine of two lists of tensors (float64)."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = sum(float(x.double().square().sum()) for x in a) ** 0.5
    nb = sum(float(y.double().square().sum()) for y in b) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def one_and_two_processes(tiny: dict[str, str], tmp: Path, max_steps: int, keys: dict) -> tuple[dict, dict]:
    """The same global batch (8 samples, all every step) trained on 1 process and on 2 DDP (gloo) ranks,
    plain SGD (the ranks' float32 reduction order is then the only difference, passed on linearly; Adam's
    per-coordinate division amplifies it where a projection left a coordinate near zero). Asserts the two
    final weights agree to 1e-5 of the update or 8 ulps; returns ({1: log, 2: log} of the rebuild
    records, {1: state, 2: state})."""
    import torch

    states, logs = {}, {}
    for nproc in (1, 2):
        out = tmp / f"procs_{nproc}"
        cfg = base_config(tiny, out, per_device_train_batch_size=8 // nproc, max_samples=8, max_steps=max_steps,
                          optim="sgd", learning_rate=0.05, max_grad_norm=0.0, **keys)
        if nproc == 2:
            cfg["ddp_backend"] = "gloo"
        run_cli(cfg, tmp / f"run_{nproc}", env=TORCHRUN if nproc == 2 else None)
        states[nproc], logs[nproc] = load_state(out), ogpsa_log(out)
    update = max_diff(states[1], load_state(Path(tiny["model"])))
    gap = max_diff(states[1], states[2])
    ulp = torch.finfo(torch.float32).eps * max(float(v.abs().max()) for v in states[1].values())
    print(f"1 vs 2 processes: {gap:.2e} (update {update:.2e}, ulp {ulp:.1e})")
    assert gap <= max(1e-5 * update, 8 * ulp)
    return {n: [r for r in log if r.get("event") == "rebuild"] for n, log in logs.items()}, states
