"""`OGPSACallback`: the projection inside a Hugging Face / LLaMA-Factory trainer.

The training order of one optimizer step, written down once here (DESIGN.md repeats it):

    on_step_begin        rebuild the subspace if this step is due (step 0, then every K steps):
                         reference forward/backward with .grad empty before and after, RNG forked
    for each micro-batch: forward -> backward       (gradients accumulate; DDP all-reduces on the last
                                                     micro-batch; ZeRO and FSDP2 reduce into shards)
    clip                 trainer (DDP, FSDP2: clip_grad_norm_) or engine (ZeRO: unscale_and_clip_grads)
    project              g <- g - U^T U g on the accumulated, synchronised, clipped gradient; with
                         ogpsa_target=update, also note the weights' coordinates c = U theta
    optimizer.step()
    project the step     ogpsa_target=update only: theta <- theta - U^T (U theta - c), on the float32
                         master weights, so the step the optimizer actually took (Adam's rescaling,
                         weight decay) is orthogonal too
    zero_grad

Where "project" and "project the step" run depends on the engine (`sharding.py`): in the trainer's
`on_pre_optimizer_step` / `on_optimizer_step` for one process, DDP and FSDP2; inside
`engine.step()`, around each ZeRO partition group's `_optimizer_step`, for DeepSpeed ZeRO-1/2/3
(the engine steps from `backward()`, before the trainer's callbacks fire). Either way the
projected update equals the projection of the accumulated gradient, every data-parallel rank
projects the same averaged gradient with the same basis (or its own piece of both, with the inner
products summed over ranks), and no reference gradient is ever in .grad when the optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from typing import Any, Optional

import torch
from llamafactory.extras.logging import get_logger
from transformers import TrainerCallback

from . import checkpoint
from .engines import check_arguments, detect
from .projection import (
    MODES,
    BasisBuilder,
    NonFiniteGradient,
    ProjectionStats,
    SubspaceBasis,
    basis_fingerprint,
    project_,
    project_change_,
    span_coordinates,
)
from .reference import (
    PAD_MULTIPLE,
    ReferenceDataError,
    ReferenceSet,
    check_registered,
    num_batches,
    reference_gradients,
    sharded_reference_gradients,
    tokenize_reference_sets,
)
from .settings import BASIS_DTYPES, OGPSAArguments, OGPSAConfigError
from .sharding import Replicated, ShardLayout

# A child of LLaMA-Factory's logger: its format, its verbosity setting (LLAMAFACTORY_VERBOSITY) and its
# running_log.txt (what LlamaBoard shows) apply to OGPSA's messages too.
logger = get_logger("llamafactory.ogpsa")

LOG_FILE = "ogpsa_log.jsonl"
METRIC_PREFIX = "ogpsa/"


class OGPSACallback(TrainerCallback):
    """Builds the capability subspace and projects every optimizer step's gradient onto its complement.

    Bind LLaMA-Factory's parsed arguments with `bind(...)` before the trainer is built (the stage
    integration does this); the reference sets are tokenised in `on_init_end`, the first basis is
    built in `on_train_begin`.
    """

    # ogpsa_target=update: the log key of the norm removed from the optimizer's actual step
    STEP_REMOVED_KEY = "update_in_span_norm"

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
        self.layout: ShardLayout = Replicated([])
        self._undo_hook = None
        # ogpsa_target=update: U theta per parameter group (one group unless ZeRO), kept by projected steps
        self._coords: dict[int, torch.Tensor] = {}
        self._stats: list[ProjectionStats] = []  # this step's projections, one per group
        self._stats_after: list[ProjectionStats] = []
        self._in_span_sq = 0.0
        self._step_args = None
        self._step_record: dict[str, Any] = {}
        self._output_existed = True
        self._log_path: Optional[str] = None
        # blocks whose reference gradient was zero at a rebuild (LoRA's A while B = 0): one follow-up
        # rebuild at the next step; blocks still zero then (unused by the reference data) are left alone
        self._followup_due = False
        self._still_zero: set[int] = set()

    # ---- set-up -------------------------------------------------------------------------------
    def bind(self, model_args, data_args, training_args, finetuning_args, *_ignored) -> None:
        """Receive LLaMA-Factory's parsed arguments; validate what can be validated before loading."""
        self.model_args, self.data_args = model_args, data_args
        self.training_args, self.finetuning_args = training_args, finetuning_args
        self._output_existed = os.path.exists(training_args.output_dir)
        check_supported(training_args, finetuning_args, self.settings)
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
            pad_to_multiple_of=PAD_MULTIPLE,
            label_pad_token_id=-100,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
            compute_dtype=self.model_args.compute_dtype,
            tokenizer=tokenizer,
            processor=processor,
        )

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise OGPSAConfigError("ogpsa: the model has no trainable parameters")
        self.layout = detect(model, optimizer, self.params, self.settings)
        low = sorted({str(t.dtype) for t in self.layout.like() if t.dtype not in (torch.float32, torch.float64)})
        if low and self.settings.ogpsa_target == "update" and state.is_world_process_zero:
            logger.warning(
                f"ogpsa_target=update: trainable weights in {', '.join(low)} cannot resolve a step's in-span part "
                "exactly (fp32 master weights can; LLaMA-Factory keeps them unless pure_bf16 is set)"
            )
        restored = state.global_step > 0 and self.settings.ogpsa_save_basis and self._restore(args, state)
        if state.global_step > 0 and not self.settings.ogpsa_save_basis and state.is_world_process_zero:
            logger.info(f"ogpsa: ogpsa_save_basis is false: rebuilding the subspace at the resume step {state.global_step}")
        if not restored:
            self.rebuild(args, state, model)  # fails (non-finite, ...) before anything is written
        if self.layout.steps_inside_engine:
            self._undo_hook = self.layout.hook_step(self._project_group, self._project_group_step)
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self._log_path = os.path.join(args.output_dir, LOG_FILE)
            _keep_log_before(self._log_path, state.global_step)
            if not restored:  # a restored basis's rebuild record is already in the kept log
                self._write(self._last_rebuild)

    def on_train_end(self, args, state, control, **kwargs):
        if self._undo_hook is not None:
            self._undo_hook()
            self._undo_hook = None

    # ---- the step ---------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        k = self.settings.refresh_steps
        fresh = state.global_step == self.built_at_step
        due = k > 0 and state.global_step % k == 0 and not fresh
        followup = self._followup_due and not fresh
        if due or followup:
            self.rebuild(args, state, model, followup=followup)
        self._step_args = (args, state)

    def on_save(self, args, state, control, **kwargs):
        """Save this rank's basis, its step and the update-target coordinates with the checkpoint
        (nothing with ogpsa_save_basis: false; the resumed run rebuilds instead)."""
        if not self._has_basis() or not self.settings.ogpsa_save_basis:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        payload = {**self._state_identity(args), "built_at_step": self.built_at_step, "rebuilds": self.rebuilds,
                   **self._payload()}
        if args.process_index == self._state_owner(args):
            checkpoint.save(folder, args.process_index, args.world_size, payload)

    def _restore(self, args, state) -> bool:
        """Take the basis from the checkpoint being resumed (True), or say why not and rebuild (False)."""
        folder = args.resume_from_checkpoint
        if not (isinstance(folder, str) and os.path.isdir(folder)):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        device = self.params[0].device
        saved, why = checkpoint.load(folder, self._state_owner(args), args.world_size, device,
                                     self._state_identity(args))
        if not checkpoint.all_ranks_agree(saved is not None, device):
            if state.is_world_process_zero:
                logger.warning(f"ogpsa: resuming at step {state.global_step} with a fresh subspace: "
                               f"{why or 'another rank cannot restore its piece'}")
            return False
        self.built_at_step, self.rebuilds = saved["built_at_step"], saved["rebuilds"]
        self._apply_payload(saved)
        if state.is_world_process_zero:
            logger.info(f"ogpsa: resumed the subspace built at step {self.built_at_step} from {folder}")
        return True

    # The method-specific state a checkpoint carries (the null-space method overrides these, and
    # `_method_identity`).
    def _has_basis(self) -> bool:
        return self.basis is not None

    def _payload(self) -> dict[str, Any]:
        return {"basis": self.basis.state_dict(), "coords": dict(self._coords), "followup_due": self._followup_due,
                "still_zero": sorted(self._still_zero)}

    def _apply_payload(self, saved: dict[str, Any]) -> None:
        self.basis = SubspaceBasis.from_state_dict(saved["basis"])
        self._coords = dict(saved["coords"])
        self._followup_due, self._still_zero = saved["followup_due"], set(saved["still_zero"])

    def _state_owner(self, args) -> int:
        """Whose file this rank saves and loads: its own piece when sharded, else rank 0's copy
        (replicated ranks hold the same basis; one copy on disk, not one per rank)."""
        return args.process_index if self.layout.sharded else 0

    def _state_identity(self, args) -> dict[str, Any]:
        """What a saved basis must share with this run to be valid here."""
        s = self.settings
        return {
            "method": s.ogpsa_method,
            "world_size": args.world_size,
            "engine": self.layout.engine,
            "reference": list(s.reference_names),
            "reference_samples": s.ogpsa_reference_samples,
            **self._method_identity(),
        }

    def _method_identity(self) -> dict[str, Any]:
        s = self.settings
        return {"local_numels": [t.numel() for t in self.layout.like()], "granularity": s.ogpsa_granularity,
                "basis_dtype": s.ogpsa_basis_dtype}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.layout.steps_inside_engine:
            self._project_group(0)
        self._finish_gradient(state)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.layout.steps_inside_engine:
            self._project_group_step(0)
        if self._step_record:
            if self.settings.ogpsa_target == "update":
                in_span = self._in_span_sq**0.5
                self._pending[self.STEP_REMOVED_KEY].append(in_span)
                self._step_record[self.STEP_REMOVED_KEY] = in_span
            self._write(self._step_record)
        self._step_record, self._in_span_sq = {}, 0.0

    def _project_group(self, group: int) -> None:
        """Project one parameter group's (clipped, synchronised) gradient; note U theta for the update."""
        reduce = self.layout.reduce
        grads = self.layout.grads(group)
        self._stats.append(project_(grads, self.basis, self.settings.ogpsa_mode, reduce))
        if self._step_args is not None and self._due_to_log(*self._step_args):
            # Measured, not assumed: cosine of the projected gradient with each reference gradient.
            self._stats_after.append(project_(grads, self.basis, "observe", reduce))
        if self.settings.ogpsa_target == "update" and group not in self._coords:  # once per basis
            self._coords[group] = span_coordinates(self.layout.weights(group), self.basis, reduce)

    def _project_group_step(self, group: int) -> None:
        """ogpsa_target=update: remove the in-span part of the step the optimizer just took."""
        if self.settings.ogpsa_target != "update" or group not in self._coords:
            return
        in_span, self._coords[group] = project_change_(
            self.layout.weights(group), self.basis, self._coords[group], self.settings.ogpsa_mode, self.layout.reduce
        )
        self._in_span_sq += in_span**2

    def _finish_gradient(self, state) -> None:
        """Merge this step's per-group statistics into one record (none when the engine skipped the step)."""
        if not self._stats:
            return
        stats = ProjectionStats.merge(self._stats)
        record = {
            "step": state.global_step + 1,
            "grad_norm": stats.grad_norm,
            "removed_fraction": stats.removed_fraction,
            "projected_blocks": stats.projected_blocks,
        }
        for name, cos in zip(self.basis.names, stats.cosines):
            record[f"cos/{name}"] = cos
        if self._stats_after:
            after = ProjectionStats.merge(self._stats_after)
            for name, cos in zip(self.basis.names, after.cosines):
                record[f"cos_after/{name}"] = cos
        for key, value in record.items():
            if key != "step":
                self._pending[key].append(float(value))
        self._stats, self._stats_after = [], []
        self._step_record = record

    # ---- rebuild ----------------------------------------------------------------------------
    def rebuild(self, args, state, model, followup: bool = False) -> None:
        """Recompute reference gradients at the current weights and orthonormalise them.

        followup: this rebuild re-measures blocks that had a zero reference gradient at the last
        one (a LoRA A while B is still 0 gets a gradient once B has taken one step)."""
        start = time.perf_counter()
        self.basis = None  # free the old basis first: a rebuild then peaks at one basis + one gradient
        self._coords = {}  # coordinates in the old basis mean nothing in the new one
        name = BASIS_DTYPES[self.settings.ogpsa_basis_dtype]
        dtype = getattr(torch, name) if name else None
        builder = BasisBuilder(self.layout.like(), len(self.refs), self.settings.ogpsa_granularity,
                               reduce=self.layout.reduce, dtype=dtype)
        norms, tokens = self._fill(builder, args, state, model)
        self.layout.check_no_pending_reduction()  # no reference gradient left queued in the engine
        self.basis = builder.finish()
        spread = rank_spread(self.basis, sharded=self.layout.sharded)
        if spread != 0.0:
            logger.warning(f"ogpsa: data-parallel ranks hold different bases (spread {spread:.3e})")
        self.built_at_step = state.global_step
        self.rebuilds += 1
        zero = {b for b, c in enumerate(self.basis.coords) if c.shape[1] == 0}
        self._followup_due, self._still_zero = followup_after(zero, self._still_zero, followup)
        if self._followup_due and state.is_world_process_zero:
            logger.info(f"ogpsa: {len(zero)} of {len(self.basis.coords)} blocks had a zero reference gradient at "
                        f"step {state.global_step} (LoRA's A while B = 0); rebuilding at the next step")
        seconds = time.perf_counter() - start
        self._pending["rebuild_seconds"].append(seconds)
        event = {"event": "rebuild", "step": state.global_step, "seconds": round(seconds, 4)}
        event.update({"zero_rank_blocks": len(zero), "followup": followup})
        event.update({"rank": self.basis.rank(), **self._basis_bytes()})
        event.update({"params": len(self.params), "param_numel": sum(map(self.layout.full_numel, range(len(self.params))))})
        event.update({"world_size": args.world_size, "engine": self.layout.engine, "rank_spread": spread})
        event.update({f"grad_norm/{n}": v for n, v in norms.items()})
        event.update(tokens)  # tokens/, input_tokens/, padded_tokens/<set>
        self._last_rebuild = event
        self._write(event)

    def _fill(self, builder: BasisBuilder, args, state, model) -> tuple[dict, dict]:
        """Run the reference sets through the model and commit each gradient to `builder`; return the
        sets' gradient norms and token counts."""
        device = self.params[0].device
        layout = self.layout
        # zero-copy (autograd accumulates into the basis rows) needs whole parameters in their own dtype
        direct = not layout.sharded and all(r.dtype == p.dtype for r, p in zip(builder.next_row(), self.params))
        norms, tokens = {}, {}
        batch_size, bar = self._reference_pass(args, state, "ogpsa rebuild")
        if direct:
            grads = reference_gradients(model, self.params, self.refs, self.collator, batch_size, device,
                                        builder.next_row, bar)
        else:
            grads = sharded_reference_gradients(model, self.params, self.refs, self.collator, batch_size, device,
                                                builder.next_row, layout, bar)
        with bar:
            for g in grads:
                try:
                    norms[g.name] = builder.commit(g.name, scale=g.scale / max(g.answer_tokens, 1))
                except NonFiniteGradient:
                    raise ReferenceDataError(
                        f"ogpsa_reference: the gradient of reference set {g.name!r} is not finite at step "
                        f"{state.global_step} (check the data and the learning rate)"
                    ) from None
                tokens[f"tokens/{g.name}"] = g.answer_tokens
                tokens[f"input_tokens/{g.name}"] = g.input_tokens
                tokens[f"padded_tokens/{g.name}"] = g.padded_tokens
        return norms, tokens

    def _reference_pass(self, args, state, label: str):
        """(micro-batch size, progress bar over this rank's micro-batches) of one pass over the reference sets."""
        from tqdm.auto import tqdm

        batch_size = self.settings.ogpsa_reference_batch_size or args.per_device_train_batch_size
        bar = tqdm(total=num_batches(self.refs, batch_size, even=self.layout.collective_forward),
                   desc=f"{label} @ step {state.global_step}", disable=not state.is_world_process_zero, leave=False)
        return batch_size, bar

    def _basis_bytes(self) -> dict[str, int]:
        """This rank's basis bytes and, sharded, the total over ranks."""
        local = self.basis.nbytes()
        if not self.layout.sharded:
            return {"basis_bytes": local, "basis_bytes_total": local}
        total = torch.tensor([float(local)], dtype=torch.float64, device=self.basis.ref_norms.device)
        return {"basis_bytes": local, "basis_bytes_total": int(self.layout.reduce(total).item())}

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


def followup_after(zero: set[int], still_zero: set[int], followup: bool) -> tuple[bool, set[int]]:
    """(rebuild at the next step?, blocks known to stay at rank 0) after a rebuild that left the
    blocks `zero` without a direction. A follow-up records what is still zero; a scheduled rebuild
    asks for a follow-up only when a block is zero that was not zero after the last follow-up, so a
    tensor the reference data never reaches costs one extra rebuild, not one per interval."""
    if followup:
        return False, set(zero)
    return bool(zero - still_zero), still_zero


def _keep_log_before(path: str, step: int) -> None:
    """Start the log afresh (step 0), or keep what a resumed run already did before `step`: records
    of an earlier run into the same output_dir, or of the attempt after the checkpoint, would
    otherwise be counted twice."""
    if not os.path.exists(path):
        return
    if step == 0:
        os.remove(path)
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _record_step(line) is not None and _record_step(line) < step + (
        0 if '"event": "rebuild"' in line else 1)]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _record_step(line: str):
    try:
        return int(json.loads(line).get("step"))
    except (ValueError, TypeError, AttributeError):
        return None


def rank_spread(basis: SubspaceBasis, sharded: bool = False) -> float:
    """Largest difference across data-parallel ranks of a fingerprint of the basis (0.0 = identical).

    The fingerprint (sums of the coordinates, reference norms and, unless each rank holds only its
    own piece of the rows, one projection of a fixed vector) is cheap and changes with any
    difference in the reference gradients or the rows. Each row is reduced in float32 without a
    float32 copy of it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    fingerprint = basis_fingerprint(basis, rows=not sharded).reshape(1)
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    values = torch.cat(gathered)
    return float(values.max() - values.min())


def _steps(args, state) -> int:
    """The trainer's own logging interval (`TrainerState.compute_steps` rounds a ratio up)."""
    steps = getattr(state, "logging_steps", None) or args.logging_steps
    if steps < 1:  # a ratio of max_steps, as transformers allows
        steps = math.ceil(steps * state.max_steps)
    return max(1, int(steps))


def check_supported(training_args, finetuning_args, settings: OGPSAArguments) -> None:
    """Refuse, from the parsed arguments, set-ups the projection cannot serve (see `engines.py`)."""

    def get(key):
        for args in (training_args, finetuning_args):
            if hasattr(args, key):
                return getattr(args, key)
        return None

    check_arguments(get, settings)
