"""`OGPSACallback`: a constraint (`constraint.py`) inside a Hugging Face / LLaMA-Factory trainer.

The callback owns what every method shares: the schedule (build at step 0, every
`ogpsa_refresh_steps`, follow-ups, resume from a checkpoint), the trainer slots (including the ZeRO
`_optimizer_step` wrap), logging (ogpsa_log.jsonl and the trainer's metrics) and checkpoint I/O.
What a method does at each slot is its constraint's: `methods/gradient_span/method.py`,
`methods/null_space/method.py`.

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

from . import checkpoint, dist
from .constraint import BuildContext, Constraint, SetupContext, make
from .engines import detect
from .files import discard_if_created_empty
from .preflight import preflight
from .reference import PAD_MULTIPLE, ReferenceSet, num_batches, tokenize_reference_sets
from .settings import OGPSAArguments, OGPSAConfigError
from .sharding import Replicated, ShardLayout

# A child of LLaMA-Factory's logger: its format, its verbosity setting (LLAMAFACTORY_VERBOSITY) and its
# running_log.txt (what LlamaBoard shows) apply to OGPSA's messages too.
logger = get_logger("llamafactory.ogpsa")

LOG_FILE = "ogpsa_log.jsonl"
METRIC_PREFIX = "ogpsa/"
SHARDED_ENGINES = ("zero1", "zero2", "zero3", "fsdp2")


class OGPSACallback(TrainerCallback):
    """Drives the constraint `settings.ogpsa_method` names through the trainer's steps.

    Bind LLaMA-Factory's parsed arguments with `bind(...)` before the trainer is built (the stage
    integration does this); the reference sets are tokenised in `on_init_end`, the constraint is
    set up and first built in `on_train_begin`.
    """

    def __init__(self, settings: OGPSAArguments, constraint: Optional[Constraint] = None):
        """constraint: drive this instead of `make(settings)`, for a caller that wraps the method's
        constraint in an object implementing the same protocol and delegating to it (the benchmark's
        timing proxy); it must be for `settings.ogpsa_method`, the name the logs and checkpoints carry."""
        self.settings = settings
        self.constraint: Constraint = make(settings) if constraint is None else constraint
        if self.constraint.method != settings.ogpsa_method:
            raise ValueError(f"OGPSACallback: the constraint given is for ogpsa_method={self.constraint.method!r}, "
                             f"the settings name {settings.ogpsa_method!r}")
        self.model_args = self.data_args = self.training_args = self.finetuning_args = None
        self.refs: list[ReferenceSet] = []
        self.collator = None
        self.params: list[torch.nn.Parameter] = []
        self.built_at_step = -1
        self.rebuilds = 0
        self._pending: dict[str, list[float]] = defaultdict(list)
        self._last_rebuild: dict[str, Any] = {}
        self.layout: ShardLayout = Replicated([])
        self._undo_hook = None
        self._removed_sq = 0.0  # ogpsa_target=update: squared norm the step projection removed this step
        self._step_args = None
        self._step_record: dict[str, Any] = {}
        self._output_existed = True
        self._log_path: Optional[str] = None

    # ---- set-up -------------------------------------------------------------------------------
    def bind(self, model_args, data_args, training_args, finetuning_args, *_ignored) -> None:
        """Receive LLaMA-Factory's parsed arguments; validate what can be validated before loading."""
        self.model_args, self.data_args = model_args, data_args
        self.training_args, self.finetuning_args = training_args, finetuning_args
        self._output_existed = os.path.exists(training_args.output_dir)
        preflight(_parsed_getter(data_args, training_args, finetuning_args), settings=self.settings)

    def discard_empty_output_dir(self) -> None:
        """After a failed start: remove output_dir if this run created it and it is still empty."""
        discard_if_created_empty(getattr(self.training_args, "output_dir", None), self._output_existed)

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
        refused = self.constraint.supports(self.layout)
        if refused:
            raise OGPSAConfigError(refused)
        self.constraint.setup(SetupContext(model, self.params, self.layout, state.is_world_process_zero))
        restored = state.global_step > 0 and self.settings.ogpsa_save_basis and self._restore(args, state)
        if state.global_step > 0 and not self.settings.ogpsa_save_basis and state.is_world_process_zero:
            logger.info(f"ogpsa: ogpsa_save_basis is false: rebuilding the subspace at the resume step {state.global_step}")
        if not restored:  # fails (non-finite, ...) before anything is written
            self.rebuild(args, state, model, reason="start" if state.global_step == 0 else "resume")
        if self.layout.steps_inside_engine:
            self._undo_hook = self.layout.hook_step(self._project_group, self._project_group_step)
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            self._log_path = os.path.join(args.output_dir, LOG_FILE)
            keep_log_before(self._log_path, state.global_step)
            if not restored:  # a restored build's record is already in the kept log
                self._write(self._last_rebuild)

    def on_train_end(self, args, state, control, **kwargs):
        if self._undo_hook is not None:
            self._undo_hook()
            self._undo_hook = None

    # ---- the schedule -------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        due, followup = rebuild_due(state.global_step, self.built_at_step, self.settings.refresh_steps,
                                    self.constraint.followup_due)
        if due or followup:
            self.rebuild(args, state, model, followup=followup, reason="followup" if followup else "scheduled")
        self._step_args = (args, state)

    def rebuild(self, args, state, model, followup: bool = False, reason: str = "scheduled") -> None:
        """Build the constraint's state at the current weights and log the build.

        followup: this build re-measures what the last one could not (`Constraint.followup_due`).
        reason: why it runs, logged ("start", "resume", "scheduled", "followup")."""
        start = time.perf_counter()
        ctx = BuildContext(model=model, refs=self.refs, collator=self.collator, step=state.global_step,
                           world_size=args.world_size, is_main=state.is_world_process_zero, followup=followup,
                           reference_pass=lambda label, refs=None: self._reference_pass(args, state, label, refs))
        fields = self.constraint.build(ctx)
        self.built_at_step = state.global_step
        self.rebuilds += 1
        seconds = time.perf_counter() - start
        self._pending["rebuild_seconds"].append(seconds)
        event = {"event": "rebuild", "step": state.global_step, "reason": reason, "seconds": round(seconds, 4),
                 **fields}
        event.update({"world_size": args.world_size, "engine": self.layout.engine})
        self._last_rebuild = event
        self._write(event)

    def _reference_pass(self, args, state, label: str, refs=None):
        """(micro-batch size, progress bar over this rank's micro-batches) of one pass over `refs` (the
        reference sets, or the groups a constraint splits them into)."""
        from tqdm.auto import tqdm

        batch_size = self.settings.ogpsa_reference_batch_size or args.per_device_train_batch_size
        bar = tqdm(total=num_batches(self.refs if refs is None else refs, batch_size,
                                     even=self.layout.collective_forward),
                   desc=f"{label} @ step {state.global_step}", disable=not state.is_world_process_zero, leave=False)
        return batch_size, bar

    # ---- checkpoint ---------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        """Save the constraint state and the step it was built at with the checkpoint (nothing with
        ogpsa_save_basis: false; the resumed run rebuilds instead): rank 0's one copy when replicated,
        each rank's piece when sharded (`checkpoint.py`)."""
        if not self.constraint.ready() or not self.settings.ogpsa_save_basis:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        payload = {**self._state_identity(), **self._state_layout(args), "built_at_step": self.built_at_step,
                   "rebuilds": self.rebuilds, **self.constraint.state_dict()}
        if self.layout.sharded or args.process_index == 0:
            checkpoint.save(folder, args.process_index, args.world_size, payload, replicated=not self.layout.sharded)

    def _restore(self, args, state) -> bool:
        """Take the state from the checkpoint being resumed (True), or say why not and rebuild (False).

        A replicated state resumes on any number of processes; a sharded one is re-cut to this run's
        pieces when its layout differs (`checkpoint.py`), or stops the run when it cannot be."""
        folder = args.resume_from_checkpoint
        if not (isinstance(folder, str) and os.path.isdir(folder)):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        device = self.params[0].device
        saved, why = self._read_state(folder, args, device)
        if not dist.all_ranks_agree(saved is not None, device):
            if state.is_world_process_zero:
                logger.warning(f"ogpsa: resuming at step {state.global_step} with a fresh subspace: "
                               f"{why or 'another rank cannot restore its piece'}")
            return False
        self.built_at_step, self.rebuilds = saved["built_at_step"], saved["rebuilds"]
        self.constraint.load_state_dict(saved)
        if state.is_world_process_zero:
            logger.info(f"ogpsa: resumed the subspace built at step {self.built_at_step} from {folder}"
                        + (f" ({saved['resharded']})" if saved.get("resharded") else ""))
        return True

    def _read_state(self, folder: str, args, device) -> tuple[Optional[dict], str]:
        """This rank's state from `folder`, read as saved or re-cut to this run's layout (None, why: none
        there, or saved under other settings)."""
        found = checkpoint.find(folder)
        if found is None:
            return None, f"no {checkpoint.FOLDER}/ state in {folder}"
        mine = self._state_layout(args)
        first, why = checkpoint.read(found.paths[0], device, mmap=not found.replicated)
        if first is None:
            return None, why
        why = checkpoint.mismatch(first, self._state_identity(), found.paths[0])
        if why:
            return None, why
        if first.get("format") == 1:
            first = self._legacy_layout(first, found, mine, folder)
        if not (found.replicated or first["engine"] in SHARDED_ENGINES):  # a format-1 replicated copy
            found = checkpoint.Saved(found.paths[:1], 1, True)
            first = self._legacy_layout(checkpoint.read(found.paths[0], device)[0], found, mine, folder)
        if first["full_numels"] != mine["full_numels"]:
            return None, (f"{found.paths[0]} holds parameters of {sum(first['full_numels'])} elements in "
                          f"{len(first['full_numels'])} tensors, this run trains {sum(mine['full_numels'])} in "
                          f"{len(mine['full_numels'])}")
        if found.replicated and not self.layout.sharded:
            return first, ""  # whole parameters, as this run holds them
        same = (not found.replicated and found.world_size == args.world_size and first["engine"] == mine["engine"])
        if same:
            own, why = checkpoint.read(found.paths[args.process_index], device)
            if own is not None and own.get("format") == 1:
                own = self._legacy_layout(own, found, mine, folder)
            if own is not None and own["pieces"] == mine["pieces"]:
                return own, ""
        return self._reshard(found, first, mine, folder, device), ""

    def _reshard(self, found, first: dict, mine: dict, folder: str, device) -> dict:
        """This rank's state cut from every saved rank's pieces (`Constraint.reshard`)."""
        states = [first]
        for path in found.paths[1:]:
            state, why = checkpoint.read(path, device, mmap=True)
            if state is None:
                raise OGPSAConfigError(
                    f"ogpsa: {folder} holds the constraint state of {found.world_size} ranks under {first['engine']}, "
                    f"and {why}: resume on {found.world_size} ranks under {first['engine']} with every rank's file, "
                    "or set ogpsa_save_basis: false to rebuild")
            states.append(state if state.get("format") != 1 else self._legacy_layout(state, found, mine, folder))
        pieces = [[tuple(p) for p in s["pieces"]] for s in states]
        cut = self.constraint.reshard(states, pieces, [tuple(p) for p in mine["pieces"]], device)
        what = f"re-cut from {found.describe()} under {first['engine']} to this run's {mine['engine']} pieces"
        return {**cut, "built_at_step": first["built_at_step"], "rebuilds": first["rebuilds"], "resharded": what}

    def _legacy_layout(self, state: dict, found, mine: dict, folder: str) -> dict:
        """A format-1 file: pieces are known only for a replicated state (whole parameters)."""
        if state.get("engine") in SHARDED_ENGINES:
            if found.world_size == mine["world_size"] and state["engine"] == mine["engine"]:
                return {**state, "pieces": mine["pieces"], "full_numels": mine["full_numels"]}  # laid out as saved
            raise OGPSAConfigError(
                f"ogpsa: {folder} holds a {state['engine']} constraint state of {found.world_size} ranks saved without "
                f"its pieces (an older release), which cannot be re-cut: resume on {found.world_size} ranks under "
                f"{state['engine']}, or set ogpsa_save_basis: false to rebuild")
        numels = list(state.get("local_numels") or mine["full_numels"])
        return {**state, "pieces": [[0, n] for n in numels], "full_numels": numels}

    def _state_identity(self) -> dict[str, Any]:
        """What a saved state must share with this run to be valid here (its layout aside)."""
        s = self.settings
        return {
            "method": s.ogpsa_method,
            "reference": list(s.reference_names),
            "reference_samples": s.ogpsa_reference_samples,
            **self.constraint.identity(),
        }

    def _state_layout(self, args) -> dict[str, Any]:
        """Where this rank's state lives: the engine, its world, and the piece of every parameter."""
        pieces = [self.layout.piece(i) for i in range(len(self.params))]
        return {"world_size": args.world_size, "engine": self.layout.engine,
                "pieces": [[p.start, p.stop] for p in pieces],
                "full_numels": [self.layout.full_numel(i) for i in range(len(self.params))]}

    # ---- the step -----------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.layout.steps_inside_engine:
            self._project_group(0)
        self._finish_gradient(state)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.layout.steps_inside_engine:
            self._project_group_step(0)
        if self._step_record:
            if self.settings.ogpsa_target == "update":
                key, removed = self.constraint.step_removed_key, self._removed_sq**0.5
                self._pending[key].append(removed)
                self._step_record[key] = removed
            self._write(self._step_record)
        self._step_record, self._removed_sq = {}, 0.0

    def _project_group(self, group: int) -> None:
        """Before the optimizer steps group `group` (the engine's hook calls this under ZeRO)."""
        measure = self._step_args is not None and due_to_log(*self._step_args)
        self.constraint.project_grad(group, measure)

    def _project_group_step(self, group: int) -> None:
        """After the optimizer stepped group `group`."""
        self._removed_sq += self.constraint.project_step(group)

    def _finish_gradient(self, state) -> None:
        """This step's record (none when the engine skipped the step)."""
        fields = self.constraint.grad_record()
        if fields is None:
            return
        record = {"step": state.global_step + 1, **fields}
        for key, value in fields.items():
            self._pending[key].append(float(value))
        self._step_record = record

    # ---- logging ------------------------------------------------------------------------------
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


def _parsed_getter(data_args, training_args, finetuning_args):
    """`get(key)` over LLaMA-Factory's parsed arguments, as `preflight` reads them."""

    def get(key):
        if key == "dataset_dir":
            return data_args.dataset_dir
        for args in (training_args, finetuning_args):
            if hasattr(args, key):
                return getattr(args, key)
        return None

    return get


def rebuild_due(step: int, built_at: int, refresh_steps: int, followup_due: bool) -> tuple[bool, bool]:
    """(scheduled rebuild?, follow-up rebuild?) at the start of optimizer step `step`: every
    `refresh_steps` steps (0: never after the first build), and a follow-up the constraint asked
    for; neither at the step the state was just built (or restored) at."""
    fresh = step == built_at
    due = refresh_steps > 0 and step % refresh_steps == 0 and not fresh
    return due, followup_due and not fresh


def due_to_log(args, state) -> bool:
    """Whether the trainer logs at the end of the step now running."""
    step = state.global_step + 1
    if args.logging_first_step and step == 1:
        return True
    return args.logging_strategy == "steps" and args.logging_steps > 0 and step % _steps(args, state) == 0


def keep_log_before(path: str, step: int) -> None:
    """Start the log afresh (step 0), or keep what a resumed run already did before `step`: records
    of an earlier run into the same output_dir, or of the attempt after the checkpoint, would
    otherwise be counted twice."""
    if not os.path.exists(path):
        return
    if step == 0:
        os.remove(path)
        return
    with open(path, encoding="utf-8") as f:
        kept = [line if line.endswith("\n") else line + "\n" for line in f if _kept(line, step)]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _kept(line: str, step: int) -> bool:
    """Whether a log line happened before resuming at `step`: a step record of a step up to `step` (the
    checkpoint's own last step included), a build at an earlier step (a build at `step` is redone or
    restored with its record). Lines that are not such records (blank, torn, no step) are dropped."""
    try:
        record = json.loads(line)
        at = int(record["step"])
    except (ValueError, TypeError, KeyError):
        return False
    return at < step if record.get("event") == "rebuild" else at <= step


def _steps(args, state) -> int:
    """The trainer's own logging interval (`TrainerState.compute_steps` rounds a ratio up)."""
    steps = getattr(state, "logging_steps", None) or args.logging_steps
    if steps < 1:  # a ratio of max_steps, as transformers allows
        steps = math.ceil(steps * state.max_steps)
    return max(1, int(steps))
