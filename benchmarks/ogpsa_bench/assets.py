"""What the runs train on, built offline: the toy tokenizer's data made longer, and random-initialised
Qwen2 models of preset sizes."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ogpsa.plugin.files import atomic_dir, write_json_atomic

# Model presets: random-initialised Qwen2 (tied embeddings), parameter counts close to the names.
# The vocabulary is larger than the toy tokenizer's (as Qwen's own 151936 > len(tokenizer)):
# rows beyond the tokenizer are never input, but the LM head still scores them.
SIZES = {
    "2m": {"hidden": 128, "layers": 6, "inter": 512, "heads": 4, "kv": 2, "vocab": 4096},  # --quick's: a smoke run
    "10m": {"hidden": 256, "layers": 8, "inter": 1024, "heads": 4, "kv": 2, "vocab": 8192},
    "50m": {"hidden": 512, "layers": 11, "inter": 2048, "heads": 8, "kv": 2, "vocab": 16384},
    "150m": {"hidden": 768, "layers": 14, "inter": 3072, "heads": 12, "kv": 4, "vocab": 32768},
    "500m": {"hidden": 896, "layers": 24, "inter": 4864, "heads": 14, "kv": 2, "vocab": 151936},  # Qwen2(.5)-0.5B
    "1.5b": {"hidden": 1536, "layers": 28, "inter": 8960, "heads": 12, "kv": 2, "vocab": 151936},  # Qwen2.5-1.5B
}
TRAIN_SETS = {"sft": "bench_sft", "dpo": "bench_dpo"}
REFS = ["bench_math_ref", "bench_general_ref", "bench_hhh_ref"]

# Reference answer lengths as fractions of cutoff_len, from real sets at cutoff 512 (tokens: GSM8K
# 134-414, Alpaca 38-512, BIG-bench HHH 46-512): rebuild cost depends on how unevenly they pad.
REF_SPREAD = {"bench_math_ref": (134 / 512, 414 / 512), "bench_general_ref": (38 / 512, 1.0),
              "bench_hhh_ref": (46 / 512, 1.0)}


def build_tokenizer(root: Path) -> dict[str, str]:
    """The toy tokenizer (and its tiny model and data): {'model': dir, 'data': dir}."""
    from ogpsa.data_prep import tiny

    return tiny.build(root / "tiny")


def build_data(root: Path, seq_len: int, ref_samples: int, n_train: int = 64, ref_lengths: str = "spread") -> str:
    """Bench datasets in root/data: SFT, DPO (ranking), three reference sets. Training answers run to
    ~seq_len tokens; reference answers too (`equal`) or over REF_SPREAD (`spread`, uniform)."""
    from ogpsa.data_prep import tiny

    rows = tiny.build_rows(seed=0)
    rng = random.Random(0)
    filler = [r["output"] for k in ("toy_general_ref", "toy_hhh_ref", "toy_math_ref", "toy_benign_eval") for r in rows[k]]
    target = seq_len * 4  # characters; the toy BPE averages < 4 characters a token, cutoff_len trims

    def long(text: str, fraction: float = 1.0) -> str:
        parts = [text]
        while sum(len(p) + 1 for p in parts) < target * fraction:
            parts.append(rng.choice(filler))
        return " ".join(parts)

    def cycle(src, n):
        return [src[i % len(src)] for i in range(n)]

    data = {
        TRAIN_SETS["sft"]: [{"instruction": r["instruction"], "input": "", "output": long(r["output"])}
                            for r in cycle(rows["toy_safety_sft"], n_train)],
        TRAIN_SETS["dpo"]: [{"instruction": r["instruction"], "input": "", "chosen": long(r["chosen"]),
                             "rejected": long(r["rejected"])} for r in cycle(rows["toy_safety_dpo"], n_train)],
    }
    for name, src in zip(REFS, ("toy_math_ref", "toy_general_ref", "toy_hhh_ref")):
        lo, hi = REF_SPREAD[name] if ref_lengths == "spread" else (1.0, 1.0)
        data[name] = [{"instruction": r["instruction"], "input": "", "output": long(r["output"], rng.uniform(lo, hi))}
                      for r in cycle(rows[src], ref_samples)]
    data_dir = root / "data"
    for name, r in data.items():
        write_json_atomic(data_dir / f"{name}.json", r)
    write_json_atomic(data_dir / "dataset_info.json", tiny.dataset_info(data))
    return str(data_dir)


def build_model(root: Path, size: str, tokenizer_dir: str, dtype_name: str) -> tuple[str, int]:
    """Random-init Qwen2 of a preset size with the toy tokenizer, built once per folder; returns (dir,
    parameter count)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    spec = SIZES[size]
    model_dir = root / f"model_{size}_{dtype_name}"
    meta = model_dir / "bench_meta.json"
    if meta.exists():
        return str(model_dir), json.loads(meta.read_text())["params"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=max(spec["vocab"], len(tokenizer)),
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype_name))
    params = sum(p.numel() for p in model.parameters())
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "bench_meta.json").write_text(json.dumps({"size": size, "params": params, **spec}))
    del model
    return str(model_dir), params
