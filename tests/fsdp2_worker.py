"""One rank of the FSDP2 check (tests/test_fsdp2.py runs it with torchrun, 2 processes, gloo).

The same tiny Qwen2 twice: whole on every rank (the DDP path) and sharded with torch's own
`fully_shard` (FSDP2). Both build the basis from the same reference samples and project the same
gradient and the same step; rank 0 writes the largest differences between the sharded pieces and
the matching slices of the whole tensors.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from ogpsa.plugin.engines import detect
from ogpsa.plugin.methods.gradient_span.maths import BasisBuilder, project_, project_change_, span_coordinates
from ogpsa.plugin.methods.gradient_span.gradients import reference_gradients, sharded_reference_gradients
from ogpsa.plugin.reference import ReferenceSet
from ogpsa.plugin.settings import OGPSAArguments


def collate(features):
    width = max(len(f["input_ids"]) for f in features)
    pad = lambda seq, value: list(seq) + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(f["input_ids"], 0) for f in features]),
        "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
        "labels": torch.tensor([pad(f["labels"], -100) for f in features]),
    }


def sample(seed: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(6, 14, (1,), generator=g))
    ids = torch.randint(3, vocab, (n,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * 3 + ids[3:]}


def build(model, params, layout, refs, sharded: bool):
    builder = BasisBuilder(layout.like(), len(refs), reduce=layout.reduce)
    if sharded:
        for g in sharded_reference_gradients(model, params, refs, collate, 2, torch.device("cpu"),
                                                                builder.next_row, layout):
            builder.commit(g.name, g.scale / g.answer_tokens)
    else:
        for g in reference_gradients(model, params, refs, collate, 2, torch.device("cpu"), builder.next_row):
            builder.commit(g.name, 1.0 / g.answer_tokens)
    return builder.finish()


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shard = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for layer in shard.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(shard, mesh=mesh)
    settings = OGPSAArguments(ogpsa_reference="a,b,c", stage="ogpsa_sft")
    pw = [p for p in whole.parameters() if p.requires_grad]
    ps = [p for p in shard.parameters() if p.requires_grad]
    lw, ls = detect(whole, None, pw, settings), detect(shard, None, ps, settings)
    vocab = whole.config.vocab_size
    # 5 samples per set: rank 0 takes 3 (2 micro-batches), rank 1 takes 2 (1 + a weight-0 top-up)
    refs = [ReferenceSet(f"ref{j}", [sample(10 * j + i, vocab) for i in range(5)]) for j in range(3)]
    bw, bs = build(whole, pw, lw, refs, False), build(shard, ps, ls, refs, True)

    def piece_diff(full_tensors, pieces):
        """Largest |whole[..., piece] - piece| over the parameters (last dim: the flattened tensor)."""
        worst = 0.0
        for i, (t, p) in enumerate(zip(full_tensors, pieces)):
            piece = ls.piece(i)
            if piece.numel:
                t = t.reshape(-1, ls.full_numel(i))[:, piece.start : piece.stop]
                worst = max(worst, float((t - p.reshape(t.shape)).abs().max()))
        return worst

    rows = piece_diff(bw.directions, bs.directions)
    batch = collate([sample(1000 + i, vocab) for i in range(4)])  # the same batch on both ranks
    whole(**batch).loss.backward()
    shard(**batch).loss.backward()
    sw = project_(lw.grads(), bw)
    ss = project_(ls.grads(), bs, reduce=ls.reduce)
    grads = piece_diff([p.grad for p in pw], [p.grad._local_tensor for p in ps])
    # the update target on a sign step (Adam's first step), which leaves the complement
    cw, cs = span_coordinates(lw.weights(), bw), span_coordinates(ls.weights(), bs, ls.reduce)
    with torch.no_grad():
        for p in pw:
            p.sub_(0.01 * p.grad.sign())
        for p in ps:
            p._local_tensor.sub_(0.01 * p.grad._local_tensor.sign())
    in_w, _ = project_change_(lw.weights(), bw, cw)
    in_s, _ = project_change_(ls.weights(), bs, cs, reduce=ls.reduce)
    weights = piece_diff([p.detach() for p in pw], [p._local_tensor for p in ps])
    local = torch.tensor([float(bs.nbytes())])
    dist.all_reduce(local)
    if dist.get_rank() == 0:
        report = {
            "engine": ls.engine, "rows": rows, "grads": grads, "weights": weights,
            "grad_norm": [sw.grad_norm, ss.grad_norm], "removed_fraction": [sw.removed_fraction, ss.removed_fraction],
            "cosines": [sw.cosines, ss.cosines], "in_span": [in_w, in_s],
            "basis_bytes": [bw.nbytes(), bs.nbytes(), int(local.item())], "ranks": [bw.rank(), bs.rank()],
            # what a rebuild logs as grad_norm/<set>, and the coordinates conflict mode reads
            "ref_norms": [bw.ref_norms.tolist(), bs.ref_norms.tolist()],
            "coords": [max(float(c.abs().max()) for c in b.coords) for b in (bw, bs)],
        }
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
