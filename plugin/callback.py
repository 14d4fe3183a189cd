"""`OGPSACallback`: the projection inside a Hugging Face / LLaMA-Factory trainer.

The training order of one optimizer step, as the trainer runs it with this callback attached:

    on_step_begin        rebuild the subspace if this step is due (step 0, then every K steps):
                         reference forward/backward with .grad empty before and after, RNG forked
    for each micro-batch: forward -> backward       (gradients accumulate in .grad; DDP all-reduces
                                                     on the last micro-batch)
    clip_grad_norm_                                  (trainer, when max_grad_norm > 0)
    on_pre_optimizer_step  project: g <- g - U^T U g (once, on the accumulated, synchronised gradient);
                           with ogpsa_target=update, also note the weights' coordinates c = U theta
    optimizer.step()
    on_optimizer_step      ogpsa_target=update only: theta <- theta - U^T (U theta - c), so the step
                           the optimizer actually took (Adam's rescaling, weight decay) is orthogonal too
    zero_grad

So the projected update equals the projection of the accumulated gradient, every data-parallel
rank projects the same averaged gradient with the same basis, and no reference gradient is ever
in .grad when the optimizer steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from .projection import (
    MODES,
    BasisBuilder,
    NonFiniteGradient,
    SubspaceBasis,
    project_,
    project_change_,
    span_coordinates,
)
from .reference import (
    ReferenceDataError,
    ReferenceSet,
    check_registered,
    num_batches,
    reference_gradients,
    tokenize_reference_sets,
)
from .settings import OGPSAArguments, OGPSAConfigError

logger = logging.getLogger(__name__)

LOG_FILE = "ogpsa_log.jsonl"
METRIC_PREFIX = "ogpsa/"


class OGPSACallback(TrainerCallback):
    """Builds the capability subspace and projects every optimizer step's gradient onto its complement.

    Bind LLaMA-Factory's parsed arguments with `bind(...)` before the trainer is built (the stage
    integration does this); the reference sets are tokenised in `on_init_end`, the first basis is
    built in `on_train_begin`.
    """

    def __init__(self, settings: OGPSAArguments):
        if settings.ogpsa_mode not in MODES:
            raise OGPSAConfigError(f"ogpsa_mode: expected one of {MODES}, got {settings.ogpsa_mode!r}")
        self.settings = settings
        self.model_args = self.data_args = self.training_args = self.finetuning_args = None
        self.refs: list[ReferenceSet] = []
        self.collator = None
        self.params: list[torch.nn.Parameter] = []
        self.basis: Optional[SubspaceBasis] = None
        self.built_at_step = -1
        self.rebuilds = 0
        self._pending: dict[str, list[float]] = defaultdict(list)
        self._last_rebuild: dict[str, Any] = {}
        self._coords: Optional[torch.Tensor] = None  # ogpsa_target=update: U theta, kept by projected steps
        self._step_record: dict[str, Any] = {}
        self._output_existed = True
        self._log_path: Optional[str] = None

    # ---- set-up -------------------------------------------------------------------------------
    def bind(self, model_args, data_args, training_args, finetuning_args, *_ignored) -> None:
        """Receive LLaMA-Factory's parsed arguments; validate what can be validated before loading."""
        self.model_args, self.data_args = model_args, data_args
        self.training_args, self.finetuning_args = training_args, finetuning_args
        self._output_existed = os.path.exists(training_args.output_dir)
        check_supported(training_args, finetuning_args)
        if isinstance(data_args.dataset_dir, str):
            check_registered(self.settings.reference_names, data_args.dataset_dir)

    def discard_empty_output_dir(self) -> None:
        """After a failed start: remove output_dir if this run created it and it is still empty."""
        path = getattr(self.training_args, "output_dir", None)
        if path and not self._output_existed and os.path.isdir(path) and not os.listdir(path):
            try:
                os.rmdir(path)
            except OSError:
                pass  # another rank got there first

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.data_args is None:
            raise OGPSAConfigError("OGPSACallback.bind(...) was not called before the trainer was built")
        from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer

        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        processor = processing_class if processing_class is not tokenizer else None
        template = get_template_and_fix_tokenizer(tokenizer, self.data_args)
        self.refs = tokenize_reference_sets(
            self.settings.reference_names,
            self.settings.ogpsa_reference_samples,
            template,
            tokenizer,
            processor,
            self.model_args,
            self.data_args,
            args,
        )
        self.collator = SFTDataCollatorWith4DAttentionMask(
            template=template,
            model=model,
            pad_to_multiple_of=8,
            label_pad_token_id=-100,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
            compute_dtype=self.model_args.compute_dtype,
            tokenizer=tokenizer,
            processor=processor,
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise OGPSAConfigError("ogpsa: the model has no trainable parameters")
        low = sorted({str(p.dtype) for p in self.params if p.dtype not in (torch.float32, torch.float64)})
        if low and self.settings.ogpsa_target == "update" and state.is_world_process_zero:
            logger.warning(
                f"ogpsa_target=update: trainable weights in {', '.join(low)} cannot resolve a step's in-span part "
                "exactly (fp32 master weights can; LLaMA-Factory keeps them unless pure_bf16 is set)"
            )
        self.rebuild(args, state, model)  # fails (non-finite, ...) before anything is written
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self._log_path = os.path.join(args.output_dir, LOG_FILE)
            self._write(self._last_rebuild)

    # ---- the step ---------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        k = self.settings.refresh_steps
        due = k > 0 and state.global_step % k == 0 and state.global_step != self.built_at_step
        if due:
            self.rebuild(args, state, model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        stats = project_([p.grad for p in self.params], self.basis, self.settings.ogpsa_mode)
        record = {
            "step": state.global_step + 1,
            "grad_norm": stats.grad_norm,
            "removed_fraction": stats.removed_fraction,
            "projected_blocks": stats.projected_blocks,
        }
        for name, cos in zip(self.basis.names, stats.cosines):
            record[f"cos/{name}"] = cos
        if self.settings.ogpsa_target == "update" and self._coords is None:  # once per basis
            self._coords = span_coordinates(self._weights(), self.basis)
        if self._due_to_log(args, state):
            # Measured, not assumed: cosine of the projected gradient with each reference gradient.
            after = project_([p.grad for p in self.params], self.basis, "observe")
            for name, cos in zip(self.basis.names, after.cosines):
                record[f"cos_after/{name}"] = cos
        for key, value in record.items():
            if key != "step":
                self._pending[key].append(float(value))
        if self._coords is None:
            self._write(record)
        else:
            self._step_record = record  # written once the update is projected too

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._coords is None:
            return
        in_span, self._coords = project_change_(self._weights(), self.basis, self._coords, self.settings.ogpsa_mode)
        self._pending["update_in_span_norm"].append(in_span)
        self._write({**self._step_record, "update_in_span_norm": in_span})

    def _weights(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.params]

    # ---- rebuild ----------------------------------------------------------------------------
    def rebuild(self, args, state, model) -> None:
        """Recompute reference gradients at the current weights and orthonormalise them."""
        from tqdm.auto import tqdm

        start = time.perf_counter()
        self.basis = None  # free the old basis first: a rebuild then peaks at one basis + one gradient
        self._coords = None  # coordinates in the old basis mean nothing in the new one
        device = self.params[0].device
        batch_size = self.settings.ogpsa_reference_batch_size or args.per_device_train_batch_size
        builder = BasisBuilder([p for p in self.params], len(self.refs), self.settings.ogpsa_granularity)
        norms, tokens = {}, {}
        bar = tqdm(
            total=num_batches(self.refs, batch_size),
            desc=f"ogpsa rebuild @ step {state.global_step}",
            disable=not state.is_world_process_zero,
            leave=False,
        )
        with bar:
            for name, grads, ntok in reference_gradients(
                model, self.params, self.refs, self.collator, batch_size, device, builder.next_row, bar
            ):
                del grads  # views of the builder's next row, which now holds the gradient sum
                try:
                    norms[name] = builder.commit(name, scale=1.0 / max(ntok, 1))
                except NonFiniteGradient:
                    raise ReferenceDataError(
                        f"ogpsa_reference: the gradient of reference set {name!r} is not finite at step "
                        f"{state.global_step} (check the data and the learning rate)"
                    ) from None
                tokens[name] = ntok
        self.basis = builder.finish()
        spread = rank_spread(self.basis)
        if spread != 0.0:
            logger.warning(f"ogpsa: data-parallel ranks hold different bases (spread {spread:.3e})")
        self.built_at_step = state.global_step
        self.rebuilds += 1
        seconds = time.perf_counter() - start
        self._pending["rebuild_seconds"].append(seconds)
        event = {"event": "rebuild", "step": state.global_step, "seconds": round(seconds, 4)}
        event.update({"rank": self.basis.rank(), "basis_bytes": self.basis.nbytes()})
        event.update({"params": len(self.params), "param_numel": sum(p.numel() for p in self.params)})
        event.update({"world_size": args.world_size, "rank_spread": spread})
        event.update({f"grad_norm/{n}": v for n, v in norms.items()})
        event.update({f"tokens/{n}": v for n, v in tokens.items()})
        self._last_rebuild = event
        self._write(event)

    # ---- logging ----------------------------------------------------------------------------
    @staticmethod
    def _due_to_log(args, state) -> bool:
        step = state.global_step + 1
        if args.logging_first_step and step == 1:
            return True
        return args.logging_strategy == "steps" and args.logging_steps > 0 and step % _steps(args, state) == 0

    def pop_log_metrics(self) -> dict[str, float]:
        """Averages since the last trainer log, under `ogpsa/...` names (merged by the trainer's log)."""
        out = {METRIC_PREFIX + k: sum(v) / len(v) for k, v in self._pending.items() if v}
        if self._pending:
            out[METRIC_PREFIX + "rebuilds"] = float(self.rebuilds)
        self._pending.clear()
        return out

    def _write(self, record: dict[str, Any]) -> None:
        if self._log_path is None:
            return
        with open(self._log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def rank_spread(basis: SubspaceBasis) -> float:
    """Largest difference across data-parallel ranks of a fingerprint of the basis (0.0 = identical).

    The fingerprint (sums of the coordinates, reference norms and one projection of a fixed
    vector) is cheap and changes with any difference in the reference gradients or the rows.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    device = basis.ref_norms.device
    probe = [torch.ones_like(d[0]) if d.shape[0] else None for d in basis.directions]
    parts = [basis.ref_norms.sum()] + [c.sum() for c in basis.coords]
    parts += [(d.float() @ p.float()).sum() for d, p in zip(basis.directions, probe) if p is not None]
    fingerprint = torch.stack([t.to(device=device, dtype=torch.float64) for t in parts]).sum().reshape(1)
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    values = torch.cat(gathered)
    return float(values.max() - values.min())


def _steps(args, state) -> int:
    steps = args.logging_steps
    if isinstance(steps, float) and steps < 1:  # a ratio of max_steps, as transformers allows
        steps = max(1, int(steps * state.max_steps))
    return int(steps)


def check_supported(training_args, finetuning_args) -> None:
    """Refuse set-ups where the gradient is not a plain `.grad` per parameter at step time."""
    if getattr(training_args, "deepspeed", None):
        raise OGPSAConfigError(
            "deepspeed: OGPSA does not support DeepSpeed ZeRO yet (gradients are partitioned inside the "
            "engine, not in param.grad); use DDP (FORCE_TORCHRUN=1 NPROC_PER_NODE=N) - see README, 'Design'"
        )
    if getattr(training_args, "fsdp", None):
        raise OGPSAConfigError(
            "fsdp: OGPSA does not support FSDP yet (sharded gradients); use DDP - see README, 'Design'"
        )
    for flag in ("use_badam", "use_galore", "use_apollo", "use_muon", "use_adam_mini"):
        if getattr(finetuning_args, flag, False):
            raise OGPSAConfigError(f"{flag}: not supported together with OGPSA stages")
