"""OGPSA overhead benchmark: plain `sft`/`dpo` against `ogpsa_sft`/`ogpsa_dpo`, with each method, on the same model and data.

    python benchmarks/run.py                                   # CPU: sizes 10m,50m, both methods
    python benchmarks/run.py --quick --out /tmp/b              # smoke run, size 2m (the test)
    python benchmarks/run.py --device cuda --sizes 500m        # one GPU, bf16
    python benchmarks/run.py --methods gradient_span           # one method

(`python -m ogpsa_bench ...` from benchmarks/ is the same.) Every run goes through LLaMA-Factory's own
`run_exp` in this process, the OGPSA stages with each `ogpsa_method` in turn (gradient_span, refreshed
at its default K (5; the previous rebuild's directions kept, so the basis has up to twice the rows
after the first rebuild); null_space, built once, its default). Per model size, stage pair
and repeat (runs interleaved: sft, ogpsa_sft per method, dpo, ogpsa_dpo per method):

- step time: the interval between consecutive `on_step_end` events (synchronised on CUDA), i.e.
  a whole optimizer step as the trainer runs it (data, forward/backward, clipping, projection,
  optimizer, callbacks); warm-up steps are dropped, the last step is kept apart for profiling.
  OGPSA steps are reported without builds (a build's own time, measured around the constraint's
  `build`, is subtracted from the step it fell in) and amortised at the method's refresh interval K:
  step + build / K.
- projection alone: the constraint's `project_grad` and `project_step` inside the real step, timed
  in place (CUDA events on the GPU, so nothing extra is synchronised; perf_counter on CPU), as a %
  of the plain step.
- rebuild vs raw: at the end of the OGPSA run, a build (`OGPSACallback.rebuild`) and the bare passes
  it needs over the same reference batches (same collator, batch size, model; forward+backward for
  gradient_span, a forward for null_space; nothing else), in turn, several times.
- memory: peak of each run (CUDA max_memory_allocated; CPU peak RSS = VmHWM, reset per run via
  /proc/self/clear_refs, falling back to getrusage's process-lifetime maximum), the basis a build
  reports and the tensors of the constraint's `state_dict()`.
- host/device copies: the last step's real `project_grad` under torch.profiler, counting memcpy and
  conversion events, plus a check that every tensor of the constraint's state is on the gradient's device.

The timing goes through the constraint interface only: the callback drives a proxy that implements
it and delegates (`instrument.TimedConstraint`). Writes <out>/bench.json (everything) and
<out>/bench.md (the table), atomically, and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .assets import SIZES, build_data, build_model, build_tokenizer

ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DISABLE_VERSION_CHECK": "1",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}
STAGES = ("sft", "dpo")


def parse(argv=None):
    from ogpsa.plugin.constraint import REGISTRY

    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help=f"comma-separated presets from {list(SIZES)} (CPU default 10m,50m; "
                                                 "CUDA default 150m,500m; --quick 2m; 500m and 1.5b are Qwen2.5-0.5B/1.5B shapes)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per size (3; --quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (CPU 4, CUDA 30; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps dropped (CPU 1, CUDA 5; quick 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=None, help="per-device batch (CPU 4, CUDA 8)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="gradient_accumulation_steps: micro-batches per optimizer step (the projection runs once "
                        "per optimizer step, so its share falls as this grows)")
    p.add_argument("--target", default="update", choices=["update", "gradient"],
                   help="ogpsa_target of the OGPSA stages (update: the default; gradient_span then makes 4 passes "
                        "over the basis per step; gradient: the paper's, 2)")
    p.add_argument("--methods", default=",".join(REGISTRY),
                   help=f"comma-separated ogpsa_method values to time, each against the same plain run "
                        f"(default: all, {','.join(REGISTRY)})")
    p.add_argument("--seq-len", type=int, default=None, help="cutoff_len and the data's length (CPU 64, CUDA 1024)")
    p.add_argument("--ref-lengths", default="spread", choices=["spread", "equal"],
                   help="reference answer lengths: spread as real GSM8K/Alpaca/HHH (default) or all ~seq-len")
    p.add_argument("--ref-samples", type=int, default=None, help="samples per reference set (CPU 8, CUDA 100 as the paper)")
    p.add_argument("--rebuild-repeats", type=int, default=None, help="rebuild/raw pairs timed at the end of each OGPSA run (CPU 1, CUDA 3)")
    p.add_argument("--stages", default="sft,dpo", help="stage pairs to run: sft, dpo or both")
    p.add_argument("--out", default="runs/bench", help="output folder (bench.json, bench.md)")
    p.add_argument("--assets", default=None, help="folder for the built tokenizer, data and models (default "
                                                  "<out>/_assets; share it between runs of the same --seq-len and "
                                                  "--ref-samples to build each model once)")
    p.add_argument("--quick", action="store_true", help="smoke run: size 2m, 1 repeat, 2 timed steps, small data")
    return p.parse_args(argv)


def _items(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def resolve(opts):
    """Fill the defaults that depend on the device and --quick; refuse what cannot run."""
    import torch
    from ogpsa.plugin.constraint import REGISTRY

    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch.cuda.is_available() is False")
    gpu = opts.device == "cuda"
    q = opts.quick
    defaults = {
        "sizes": "2m" if q else ("150m,500m" if gpu else "10m,50m"),
        "repeats": 1 if q else 3,
        "steps": 2 if q else (30 if gpu else 4),
        "warmup": 1 if q else (5 if gpu else 1),
        "batch": 2 if q else (8 if gpu else 4),
        "seq_len": 64 if q else (1024 if gpu else 64),
        "ref_samples": 4 if q else (100 if gpu else 8),
        "rebuild_repeats": 1 if q else (3 if gpu else 1),
    }
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    opts.sizes = [s.lower() for s in _items(opts.sizes)]
    bad = [s for s in opts.sizes if s not in SIZES]
    if bad:
        raise SystemExit(f"bench: unknown size(s) {bad}; known: {list(SIZES)}")
    opts.stages = _items(opts.stages)
    if not opts.stages or any(s not in STAGES for s in opts.stages):
        raise SystemExit("bench: --stages takes sft, dpo or sft,dpo")
    opts.methods = _items(opts.methods)
    bad = [m for m in opts.methods if m not in REGISTRY]
    if not opts.methods or bad or len(set(opts.methods)) < len(opts.methods):
        raise SystemExit(f"bench: --methods takes distinct ogpsa_method values from {list(REGISTRY)}, got {opts.methods}")
    if opts.warmup < 1 or opts.steps < 1 or opts.repeats < 1 or opts.grad_accum < 1:
        raise SystemExit("bench: --warmup, --steps, --repeats and --grad-accum must be >= 1")
    return opts


def main(argv=None) -> int:
    opts = parse(argv)
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    assets = Path(opts.assets).resolve() if opts.assets else out / "_assets"
    os.environ.setdefault("HF_DATASETS_CACHE", str(assets / "hf_datasets_cache"))

    import transformers
    from ogpsa.pipelines.integration.hook import arm

    arm()  # the same Trainer.log as a user's OGPSA run, for the plain stages too
    from . import loop

    resolve(opts)
    transformers.logging.set_verbosity_error()
    logging.getLogger("llamafactory").setLevel(logging.WARNING)

    tiny_paths = build_tokenizer(assets)
    data_dir = build_data(assets, opts.seq_len, opts.ref_samples, ref_lengths=opts.ref_lengths)
    dtype_name = "bfloat16" if opts.device == "cuda" else "float32"
    models, params = {}, {}
    for size in opts.sizes:
        print(f"bench: building {size} model ...", flush=True)
        models[size], params[size] = build_model(assets, size, tiny_paths["model"], dtype_name)
    raw, rows, md = loop.run(opts, models, params, data_dir, out)
    print()
    print(md)
    print(f"bench: wrote {out / 'bench.json'} and {out / 'bench.md'} ({raw['total_s']:.0f} s)")
    return 1 if any(r.get("plain_ms") is None for r in rows) else 0
