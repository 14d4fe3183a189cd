"""One rank of the partition-group check (tests/test_partition_group.py runs it with torchrun, 2 processes, gloo).

A real DeepSpeed ZeRO-2 engine over the tiny Qwen2, twice: with the world as its data-parallel group
(supported), and with an `mpu` that makes every rank its own data-parallel group, as tensor
parallelism does (each rank then partitions within a group of 1). Rank 0 writes what `detect` said
of each, and what the after-rebuild check says of the supported engine after a backward with its
reduction hooks taken out and after a plain one.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from ogpsa.plugin.engines import detect
from ogpsa.plugin.settings import OGPSAArguments, OGPSAConfigError


class AloneDataParallel:
    """Megatron-style parallel state: data parallelism of 1, the world as the model-parallel group."""

    def __init__(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        alone = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
        self.dp, self.mp, self.rank, self.world = alone[rank], dist.new_group(list(range(world))), rank, world

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_world_size(self):
        return 1

    def get_data_parallel_rank(self):
        return 0

    def get_model_parallel_group(self):
        return self.mp

    def get_model_parallel_world_size(self):
        return self.world

    def get_model_parallel_rank(self):
        return self.rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def pending(layout) -> str:
    try:
        layout.check_no_pending_reduction()
        return "none"
    except RuntimeError as e:
        return str(e)


def outcome(model_dir: str, mpu, report: dict) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "overlap_comm": False}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.1),
                                                   config=config, mpu=mpu)
    try:
        layout = detect(engine.module, optimizer, params, OGPSAArguments(ogpsa_reference="a"))
    except OGPSAConfigError as e:
        return f"refused: {e}"
    else:
        # the after-rebuild check: a backward with the reduction hooks taken out leaves the engine
        # idle; one that reaches ZeRO's hooks (what a new reduction path would do) is caught
        ids = torch.arange(3, 19).reshape(2, 8)
        with layout.reduction_suspended():
            engine.module(input_ids=ids, labels=ids).loss.backward()
        for p in params:
            p.grad = None
        report["pending_suspended"] = pending(layout)
        engine.module(input_ids=ids, labels=ids).loss.backward()
        report["pending_plain"] = pending(layout)
        return "ok: " + layout.engine
    finally:
        engine.destroy()


def main(model_dir: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    report = {}
    report["world"] = outcome(model_dir, None, report)
    report["alone"] = outcome(model_dir, AloneDataParallel(), report)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
