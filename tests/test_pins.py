"""What the pins in constraints.txt are there for (transformers 5.5.4 instead of 5.6.0)."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_is_the_pinned_release():
    import transformers

    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    assert transformers.__version__ == pins["transformers"] == "5.5.4"


def test_causal_lm_loads_a_lora_adapter_folder(tiny, tmp_path):
    """transformers 5.6.0 with PEFT 0.18.1 failed here (ImportError: _maybe_shard_state_dict_for_tp)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    loaded = AutoModelForCausalLM.from_pretrained(adapter)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tiny["model"])(ids).logits
        assert not torch.allclose(loaded(ids).logits, plain, atol=1e-5)  # the adapter was applied
