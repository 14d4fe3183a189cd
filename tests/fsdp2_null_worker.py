"""One rank of the null space's FSDP2 check (tests/test_fsdp2.py runs it with torchrun, 2 processes, gloo).

The same tiny Qwen2 (full fine-tuning, or a LoRA adapter on every linear layer) twice: whole on
every rank with its gradients averaged over the ranks as DDP does, and sharded with torch's own
`fully_shard` (FSDP2). Both run the null-space constraint as the callback drives it: a build from
the same reference samples (uneven: one rank runs a weight-0 top-up micro-batch), then three AdamW
steps on each rank's own training batch with the gradient projected before the step and the step
restored after it, and a rebuild before the third (under LoRA, with B moved: `adapter_space`). Rank 0 writes the null dimensions of both and the largest difference between
the sharded rows and the matching rows of the whole tensors.
"""

import json
import sys

import torch
import torch.distributed as dist
from fsdp2_worker import collate, sample
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ogpsa.plugin.constraint import BuildContext, SetupContext
from ogpsa.plugin.engines import detect
from ogpsa.plugin.methods.null_space.method import NullSpace
from ogpsa.plugin.reference import ReferenceSet
from ogpsa.plugin.settings import OGPSAArguments


def load(model_dir: str, tuning: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if tuning == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the same A on both copies (B starts at zero)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    return model


def run(model, refs, settings, vocab):
    """Set up, build, take two projected AdamW steps, rebuild, take a third; returns (constraint, first
    build's record with the rebuild's counts, params, layout, step records)."""
    params = [p for p in model.parameters() if p.requires_grad]
    layout = detect(model, None, params, settings)
    constraint = NullSpace(settings)
    constraint.setup(SetupContext(model, params, layout, dist.get_rank() == 0))
    passes = lambda label, sets=None: (2, tqdm(total=0, disable=True))  # noqa: E731

    def build(step):
        return constraint.build(BuildContext(model, refs, collate, step, dist.get_world_size(), dist.get_rank() == 0,
                                             False, passes))

    event = build(0)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    records = []
    for step in range(3):
        if step == 2:  # a rebuild with B moved under LoRA (its A C A^T from the whole A, gathered under FSDP2)
            rebuilt = build(2)
            event["rebuild"] = {k: rebuilt.get(k) for k in ("lora_trained_layers", "lora_b_free_dims", "null_dims")}
        batch = collate([sample(1000 + 10 * step + 4 * dist.get_rank() + i, vocab) for i in range(4)])
        model(**batch).loss.backward()
        if layout.engine == "ddp":  # what DDP's all-reduce does: the mean gradient on every rank
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(dist.get_world_size())
        constraint.project_grad(0, True)
        records.append(constraint.grad_record())
        optimizer.step()
        records[-1]["update_in_range_norm"] = constraint.project_step(0) ** 0.5
        optimizer.zero_grad(set_to_none=True)
    return constraint, event, params, layout, records


def main(model_dir: str, tuning: str, out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    whole, shard = load(model_dir, tuning), load(model_dir, tuning)
    layers = shard.base_model.model.model.layers if tuning == "lora" else shard.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(shard, mesh=mesh)
    settings = OGPSAArguments(ogpsa_reference="a,b,c", stage="ogpsa_sft", ogpsa_method="null_space",
                              ogpsa_null_alpha=0.05, ogpsa_null_layers="all_linear", ogpsa_refresh_steps=0)
    vocab = whole.config.vocab_size
    # 5 samples per set: rank 0 takes 3 (2 micro-batches), rank 1 takes 2 (1 + a weight-0 top-up)
    refs = [ReferenceSet(f"ref{j}", [sample(10 * j + i, vocab) for i in range(5)]) for j in range(3)]
    cw, ew, pw, lw, rw = run(whole, refs, settings, vocab)
    cs, es, ps, ls, rs = run(shard, refs, settings, vocab)

    worst = 0.0  # |sharded rows - the matching rows of the whole tensor|, over every trainable parameter
    for i, (a, b) in enumerate(zip(pw, ps)):
        piece = ls.piece(i)
        if piece.numel:
            whole_rows = a.detach().reshape(-1)[piece.start : piece.stop]
            worst = max(worst, float((whole_rows - b._local_tensor.reshape(-1)).abs().max()))
    projector = max(float((sw.vectors @ sw.vectors.T - ss.vectors @ ss.vectors.T).abs().max())
                    for sw, ss in zip(cw.spaces, cs.spaces))
    moved = max(float((a.detach() - b.detach()).abs().max()) for a, b in
                zip(pw, [p for p in load(model_dir, tuning).parameters() if p.requires_grad]))
    if dist.get_rank() == 0:
        keys = [k for k in ew if k.startswith(("null_dim/", "input_tokens/"))] + ["null_dims", "layers", "rebuild"]
        report = {"engine": [lw.engine, ls.engine], "build": [{k: ew[k] for k in keys}, {k: es[k] for k in keys}],
                  "lora_a_moved": [ew["lora_a_moved"], es["lora_a_moved"]], "weights": worst, "moved": moved,
                  "projector": projector, "records": [rw, rs]}
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
