"""Reference sets: tokenised once through LLaMA-Factory's own data pipeline, batched, shared by both methods.

A reference set is an SFT-format dataset registered in the run's `dataset_info.json`. It goes
through `llamafactory.data.get_dataset` with the run's template, cutoff and tokenizer (so the
loss is the NLL of the answers exactly as training would see them), is tokenised once when the
trainer is built, and is reused by every rebuild.

Batches: samples are kept longest first and batched with neighbours in length, so a micro-batch
pads little (`plan_batches`); under data parallelism the batches are dealt to the ranks by tokens
(`shard_batches`). The gradient span measures the sets' gradients from them
(`methods/gradient_span/gradients.py`), the null space its layers' inputs
(`methods/null_space/activations.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .dist import rank_and_world
from .settings import OGPSAConfigError

IGNORE_INDEX = -100


class ReferenceDataError(OGPSAConfigError):
    """A reference set that cannot be used (unknown, empty, non-finite gradient)."""


@dataclass
class ReferenceSet:
    name: str
    features: list[dict[str, Any]]  # tokenised rows: input_ids, attention_mask, labels; longest first
    _plan: Any = field(default=None, repr=False, compare=False)  # plan_batches, cached per (batch, world)
    _plan_key: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.features)


def tokenize_reference_sets(
    names: list[str], samples: int, template, tokenizer, processor, model_args, data_args, training_args
) -> list[ReferenceSet]:
    """Tokenise each reference set once with the run's template and cutoff (LLaMA-Factory pipeline)."""
    from llamafactory.data import get_dataset

    # The training data's mixing, sampling, splitting, streaming and packing settings describe the
    # training data, not a reference set: each set is one dataset, read in order, unpacked. Packing
    # shortened cutoff_len by one in DataArguments.__post_init__; undo that so the reference samples
    # are cut exactly as in an unpacked run.
    cutoff_len = data_args.cutoff_len + 1 if data_args.packing else data_args.cutoff_len
    sets = []
    for name in names:
        ref_args = dataclasses.replace(
            data_args,
            dataset=[name],
            eval_dataset=None,
            mix_strategy="concat",
            interleave_probs=None,
            val_size=0.0,
            max_samples=samples,
            tokenized_path=None,
            streaming=False,
            packing=False,
            neat_packing=False,
            cutoff_len=cutoff_len,
        )
        try:
            module = get_dataset(template, model_args, ref_args, training_args, "sft", tokenizer, processor)
        except Exception as e:  # LLaMA-Factory's own loader message, prefixed with the set
            raise ReferenceDataError(
                f"ogpsa_reference: reference set {name!r} is empty or cannot be loaded (dataset_dir "
                f"{data_args.dataset_dir!r}): {e}"
            ) from e
        data = module.get("train_dataset")
        rows = [] if data is None else [{k: row[k] for k in ("input_ids", "attention_mask", "labels")} for row in data]
        rows = [r for r in rows if any(t != IGNORE_INDEX for t in r["labels"])]
        # Longest first: micro-batches of neighbours in length waste little on padding (a set's
        # gradient is a token-weighted sum, so the order does not change it), and the first batch
        # is the largest, so a rebuild that does not fit in memory fails at once.
        rows.sort(key=lambda r: len(r["input_ids"]), reverse=True)
        if not rows:
            raise ReferenceDataError(
                f"ogpsa_reference: reference set {name!r} has no usable samples "
                f"(empty, or every answer cut off by cutoff_len={data_args.cutoff_len})"
            )
        sets.append(ReferenceSet(name, rows))
    return sets


def split_groups(refs: list[ReferenceSet], groups: int) -> list[ReferenceSet]:
    """Each set cut into `groups` disjoint groups of its samples, set by set (ogpsa_directions_per_set).

    Sample i (sets are sorted longest first) goes to group i mod groups, so the groups are alike in
    length and the split is the same on every rank and at every rebuild. Group g of set "s" is named
    "s#g". groups = 1 returns the sets themselves (names, order and batching as without a split).
    """
    if groups == 1:
        return refs
    out = []
    for ref in refs:
        if len(ref) < groups:
            raise ReferenceDataError(
                f"ogpsa_directions_per_set: reference set {ref.name!r} has {len(ref)} usable samples, fewer than "
                f"the {groups} groups asked for"
            )
        out += [ReferenceSet(f"{ref.name}#{g}", ref.features[g::groups]) for g in range(groups)]
    return out


# Padded positions a micro-batch may carry per real one. Reference samples vary a lot in length
# (GSM8K, Alpaca and HHH answers run from tens to hundreds of tokens); a batch that mixes them pads
# the short ones to the longest, and a rebuild's cost is its padded positions.
PAD_SLACK = 1.15
PAD_MULTIPLE = 8  # the reference collator pads to a multiple of 8 (tensor-core friendly shapes)


def _padded_len(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def plan_batches(lengths: list[int], batch_size: int, world: int) -> list[list[list[int]]]:
    """Per rank, its micro-batches (sample indices) of a set whose samples are sorted longest first.

    Batches: consecutive samples, at most `batch_size` (so no batch needs more memory than a full
    batch of its longest sample), closed early when one more sample would make the batch pad more
    than PAD_SLACK times its real tokens. Ranks: each batch, longest first, goes to the rank with the
    fewest padded tokens so far, so the ranks' shares are balanced by tokens, not by count.
    Deterministic: every rank computes the same plan from the same lengths.
    """
    batches: list[list[int]] = []
    for i, n in enumerate(lengths):
        current = batches[-1] if batches else None
        if current is not None and len(current) < batch_size:
            real = sum(lengths[j] for j in current) + n
            if (len(current) + 1) * _padded_len(lengths[current[0]]) <= PAD_SLACK * real:
                current.append(i)
                continue
        batches.append([i])
    plan: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for batch in batches:
        r = min(range(world), key=lambda q: (load[q], q))
        plan[r].append(batch)
        load[r] += len(batch) * _padded_len(lengths[batch[0]])
    return plan


def _plan(ref: ReferenceSet, batch_size: int, world: int) -> list[list[list[int]]]:
    key = (batch_size, world)
    if ref._plan_key != key:
        ref._plan, ref._plan_key = plan_batches([len(f["input_ids"]) for f in ref.features], batch_size, world), key
    return ref._plan


def _batches_per_rank(ref: ReferenceSet, batch_size: int, rank: int, world: int) -> int:
    return len(_plan(ref, batch_size, world)[rank])


def _most_batches(ref: ReferenceSet, batch_size: int, world: int) -> int:
    return max(len(batches) for batches in _plan(ref, batch_size, world))


def shard_batches(ref: ReferenceSet, batch_size: int, collator, device, even: bool = False
                   ) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """(micro-batch, loss weight) of this rank's share of the set (`plan_batches`).

    even: every rank yields as many micro-batches as the fullest rank, topping up with a weight-0
    copy of a sample; engines that run collectives inside forward and backward (ZeRO-3 gathers
    parameters, FSDP2 also reduce-scatters gradients) would otherwise wait forever on a rank that
    has finished.
    """
    rank, world = rank_and_world()
    for indices in _plan(ref, batch_size, world)[rank]:
        batch = collator([dict(ref.features[i]) for i in indices])
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}, 1.0
    if even:
        extra = _most_batches(ref, batch_size, world) - _batches_per_rank(ref, batch_size, rank, world)
        for _ in range(extra):
            batch = collator([dict(ref.features[-1])])  # the shortest sample: the cheapest top-up
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}, 0.0


def token_counts(batch: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """(answer, input, padded) token counts of one micro-batch (float64; answer and input 0 for a top-up)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    answer = (batch["labels"][:, 1:] != IGNORE_INDEX).sum() * int(weight)
    # a 2-D 0/1 mask marks the real positions (reference sets are never packed, so it is 2-D)
    real = mask.bool().sum() if mask is not None and mask.dim() == 2 else torch.tensor(ids.numel())
    counts = [answer, real * int(weight), torch.tensor(ids.numel())]
    return torch.stack([c.to(ids.device, torch.float64) for c in counts])


def forked_rng(device: torch.device):
    """A context whose RNG draws (dropout) leave the CPU and, on CUDA, the device stream as they were."""
    fork_devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=fork_devices, device_type=device.type if device.type != "cpu" else "cuda")


def num_batches(refs: list[ReferenceSet], batch_size: int, even: bool = False) -> int:
    """This rank's micro-batches over all sets (the fullest rank's with `even`)."""
    rank, world = rank_and_world()
    return sum(_most_batches(r, batch_size, world) if even else _batches_per_rank(r, batch_size, rank, world)
               for r in refs)


@torch.no_grad()
def answer_nll(model: torch.nn.Module, ref: ReferenceSet, collator, batch_size: int = 8) -> float:
    """Mean NLL per answer token of `ref` under `model` (one process, on the model's device): the
    reference loss a constraint is meant to hold steady, for measuring how well a run held it."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(ref.features), batch_size):
        batch = {k: v.to(device) for k, v in collator([dict(f) for f in ref.features[i : i + batch_size]]).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())  # the tokens the causal LM's shifted loss averages
        total += float(model(**batch).loss) * n
        count += n
    return total / count
