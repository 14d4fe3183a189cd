"""The benchmark (benchmarks/ogpsa_bench, run as benchmarks/run.py): a quick end-to-end run of both
methods, the summary's verdicts, and the timing proxy: it implements the constraint interface and
leaves training exactly as the stage integration runs it."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import base_config, ogpsa_keys

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"
METHODS = ["gradient_span", "null_space", "gradient_span+null_space"]  # every registered constraint


def _bench(module: str):
    """A module of the benchmark package (not installed: it lives next to its run.py)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(f"ogpsa_bench.{module}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
        check=False, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, f"benchmark failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "| size | params | stage | method |" in proc.stdout  # the table is printed at the end
    return out


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_benchmark_times_both_methods(quick_run):
    summary = _bench("summary")
    raw = json.loads((quick_run / "bench.json").read_text())
    for key in ("settings", "environment", "default_K", "refresh_steps", "targets", "memory_method", "params", "runs",
                "summary", "targets_met", "copy_check_method", "complete"):
        assert key in raw, key
    assert raw["complete"] is True
    assert raw["settings"]["device"] == "cpu" and raw["settings"]["sizes"] == ["2m"]
    assert raw["settings"]["methods"] == METHODS
    assert raw["environment"]["torch"] and raw["environment"]["device"]
    assert 1.5e6 < raw["params"]["2m"] < 2.5e6
    assert not any(f.name.startswith(".") and f.name.endswith(".tmp") for f in quick_run.iterdir())

    rows = raw["summary"]
    assert [(r["size"], r["stage"], r["method"]) for r in rows] == [
        ("2m", stage, method) for stage in ("sft", "dpo") for method in METHODS]
    for r in rows:
        assert r["repeats"] == 1 and not r["errors"]
        for key in ("plain_ms", "ogpsa_ms", "projection_ms", "projection_pct", "rebuild_s", "raw_fwd_bwd_s",
                    "rebuild_ratio", "amortised_ms", "peak_plain_mb", "peak_ogpsa_mb", "basis_mb", "state_mb"):
            assert _finite_positive(r[key]), (r["stage"], r["method"], key, r[key])
        assert math.isfinite(r["overhead_pct"]) and math.isfinite(r["amortised_overhead_pct"])
        if r["method"] != "null_space":  # the span's K (composed too); 2 timed steps < K: said so
            assert r["K"] == 5 and "rebuild/K" in r["amortised_note"]
            assert r["amortised_ms"] > r["ogpsa_ms"] and r["raw_pass"] == "forward+backward"
        else:  # null_space's default: built once, nothing to amortise
            assert r["K"] == 0 and "once" in r["amortised_note"]
            assert r["amortised_ms"] == r["ogpsa_ms"] and r["raw_pass"] == "forward"
        assert r["no_copy"] is True
        assert isinstance(r["pass_projection"], bool) and isinstance(r["pass_rebuild"], bool)
        # per real token: rebuild and plain step; padding of each (reference lengths spread as real sets)
        for key in ("rebuild_ms_per_ktok", "plain_ms_per_ktok", "per_token_ratio"):
            assert _finite_positive(r[key]), (r["stage"], r["method"], key, r[key])
        assert 1.0 <= r["ref_pad_ratio"] <= 1.3 and r["train_pad_ratio"] >= 1.0
        # memory bound: plain + the constraint's state + one float32 tensor of the largest trainable parameter
        assert isinstance(r["pass_memory"], bool)
        assert r["peak_bound_mb"] == pytest.approx(r["peak_plain_mb"] + r["state_mb"] + r["scratch_mb"])
        run = raw["runs"]["2m"][r["stage"]][0][r["method"]]
        assert r["scratch_mb"] * 2**20 == 4 * run["largest_tensor_numel"]

    for pair in ("sft", "dpo"):
        (rep,) = raw["runs"]["2m"][pair]
        assert set(rep) == {"plain", *METHODS}
        assert rep["plain"]["timed_steps"] == 2 and rep["plain"]["peak_bytes"] > 0
        assert rep["plain"]["train_padded_tokens_per_step"] >= rep["plain"]["train_real_tokens_per_step"] > 0
        for method in METHODS:
            og = rep[method]
            assert og["method"] == method and og["timed_steps"] == 2
            # timed through the constraint interface: both calls of every timed step (ogpsa_target update)
            for key in ("projection_ms", "project_grad_ms", "project_step_ms"):
                assert len(og[key]) == 2 and all(_finite_positive(x) for x in og[key]), (method, key, og[key])
            assert og["state_bytes"] >= og["basis_bytes"] > 0
            if method == "gradient_span":  # float32 rows, at most one per reference set
                assert og["basis_bytes"] <= 3 * og["trainable_numel"] * 4
            prof = og["profile"]
            assert prof["state_on_grad_device"] and prof["state_tensors"] > 0 and prof["large_copies"] == 0
            assert prof["ok"]
            # the same step's projection after optimizer.step (update target) is profiled too
            assert og["profile_step"]["state_on_grad_device"] and og["profile_step"]["large_copies"] == 0
            phases = [(b["phase"], b["step"]) for b in og["rebuilds"]]
            assert ("train", 0) in phases and ("end", 4) in phases  # the first build; the one timed after training
            assert all(_finite_positive(b["seconds"]) for b in og["rebuilds"])
            assert og["peak_bytes"] > 0 and og["ref_padded_tokens"] >= og["ref_input_tokens"] > 0

    md = (quick_run / "bench.md").read_text()
    assert summary.HEADER in md
    assert md.count("\n| 2m |") == 2 * len(METHODS)
    for method in METHODS:
        assert md.count(f"| {method} |") == 2


def test_summary_verdicts_and_flatness():
    """PASS/MISS logic on made-up numbers (no training)."""
    summary = _bench("summary")

    def result(ogpsa_ms, proj_ms, rebuild_s, raw_s, ok=True, K=30):
        return {"step_ms_median": ogpsa_ms, "projection_ms_median": proj_ms, "rebuild_s_median": rebuild_s,
                "raw_fwd_bwd_s_median": raw_s, "step_incl_rebuild_ms_mean": ogpsa_ms, "peak_bytes": 2**31,
                "basis_bytes": 3 * 4 * 10, "state_bytes": 3 * 4 * 10, "trainable_numel": 10,
                "largest_tensor_numel": 2**26, "profile": {"ok": ok}, "refresh_steps": K}

    def run(plain_ms, ogpsa_ms, proj_ms, rebuild_s, raw_s, ok=True, K=30, null=None):
        entry = {"plain": {"step_ms_median": plain_ms, "peak_bytes": 2**30},
                 "gradient_span": result(ogpsa_ms, proj_ms, rebuild_s, raw_s, ok, K)}
        if null is not None:
            entry["null_space"] = result(*null, K=0)
        return entry

    raw = {
        "settings": {"sizes": ["10m", "50m"], "stages": ["sft", "dpo"], "methods": METHODS, "steps": 4},
        "params": {"10m": 1e7, "50m": 5e7},
        "runs": {
            "10m": {"sft": [run(100.0, 102.0, 2.0, 1.0, 1.0, null=(110.0, 5.0, 3.0, 1.0))],
                    "dpo": [run(200.0, 210.0, 2.0, 1.3, 1.0, K=5)]},
            "50m": {"sft": [run(400.0, 420.0, 16.0, 4.0, 4.0, ok=False)], "dpo": [run(800.0, 810.0, 8.0, 4.0, 4.0, K=5)]},
        },
    }

    rows = {(r["size"], r["stage"], r["method"]): r for r in summary.summarise(raw)}
    assert list(rows) == [("10m", "sft", "gradient_span"), ("10m", "sft", "null_space"), ("10m", "dpo", "gradient_span"),
                          ("50m", "sft", "gradient_span"), ("50m", "dpo", "gradient_span")]  # null_space: 10m sft only
    sft10, dpo10 = rows["10m", "sft", "gradient_span"], rows["10m", "dpo", "gradient_span"]
    sft50, dpo50 = rows["50m", "sft", "gradient_span"], rows["50m", "dpo", "gradient_span"]
    null10 = rows["10m", "sft", "null_space"]
    assert sft10["overhead_pct"] == pytest.approx(2.0) and sft10["projection_pct"] == pytest.approx(2.0)
    assert null10["overhead_pct"] == pytest.approx(10.0) and null10["plain_ms"] == sft10["plain_ms"]  # the same plain run
    assert null10["amortised_ms"] == null10["ogpsa_ms"] and null10["rebuild_ratio"] == pytest.approx(3.0)
    assert null10["pass_flat"] is None  # one size
    assert sft10["pass_projection"] and not sft50["pass_projection"]  # 4% > 3%
    assert sft10["pass_rebuild"] and not dpo10["pass_rebuild"]  # 1.3x > 1.2x
    assert sft10["amortised_ms"] == pytest.approx(102.0 + 1000.0 / 30)
    assert dpo10["amortised_ms"] == pytest.approx(210.0 + 1300.0 / 5)
    assert not sft50["no_copy"] and dpo50["no_copy"]
    assert sft10["pass_flat"] is False and sft50["pass_flat"] is False  # 2% -> 4%: grows with size
    assert dpo10["pass_flat"] is True and dpo50["pass_flat"] is True  # 1% -> 1%
    # peak 2 GiB against plain 1 GiB + state 120 bytes + one float32 tensor of 2^26 elements (256 MiB)
    assert sft10["peak_bound_mb"] == pytest.approx(1024 + 120 / 2**20 + 256) and sft10["pass_memory"] is False
    table = summary.table(list(rows.values()))
    assert table.splitlines()[0] == summary.HEADER
    assert "MISS" in table and "PASS" in table and "(K=once)" in table
    assert all(line.count("|") == summary.COLUMNS + 1 for line in table.splitlines())


def test_the_timing_proxy_implements_the_constraint_interface():
    """Every member the callback may use, delegated; a constraint for another method is refused."""
    from ogpsa.plugin.callback import OGPSACallback
    from ogpsa.plugin.constraint import Constraint
    from ogpsa.plugin.preflight import preflight

    instrument = _bench("instrument")
    inner = SimpleNamespace(method="null_space", step_removed_key="update_in_range_norm", followup_due=True)
    proxy = instrument.TimedConstraint(inner, instrument.Recorder("cpu", warmup=1, timed=1))
    members = {n for n in vars(Constraint) if not n.startswith("_")} | set(Constraint.__annotations__)
    assert {"supports", "build", "project_grad", "project_step", "followup_due"} <= members
    assert all(hasattr(proxy, n) for n in members), sorted(n for n in members if not hasattr(proxy, n))
    assert (proxy.method, proxy.step_removed_key, proxy.followup_due) == ("null_space", "update_in_range_norm", True)

    settings, _ = preflight({"stage": "ogpsa_sft", "ogpsa_reference": "toy_math_ref"}, check=False)
    with pytest.raises(ValueError, match="ogpsa_method='null_space'"):
        OGPSACallback(settings, constraint=proxy)  # settings: gradient_span


@pytest.mark.parametrize("method", METHODS[:2])  # the composition delegates to these two (test_composition)
def test_timed_run_trains_as_the_stage_integration_does(tiny, tmp_path, method):
    """The same config trained by the stock `ogpsa_sft` stage and by the benchmark's instrumented run
    (timing proxy, step timer, token hook, profiled last step) ends at identical weights and losses."""
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    loop, instrument = _bench("loop"), _bench("instrument")

    class Final(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.losses = [h["loss"] for h in state.log_history if "loss" in h]

    def config(name):
        return base_config(tiny, tmp_path / name, max_steps=3, save_strategy="no",
                           **ogpsa_keys(ogpsa_method=method, ogpsa_reference_samples=4, ogpsa_refresh_steps=2))

    stock, timed = Final(), Final()
    run_exp(config("stock"), callbacks=[stock])
    rec = instrument.Recorder("cpu", warmup=1, timed=1, rebuild_repeats=0)
    callback = loop.train(config("timed"), rec, callbacks=(timed,))

    assert isinstance(callback.constraint, instrument.TimedConstraint) and callback.constraint.method == method
    assert len(stock.losses) == 3 and timed.losses == stock.losses
    assert timed.weights.keys() == stock.weights.keys()
    changed = [n for n in stock.weights if not (stock.weights[n] == timed.weights[n]).all()]
    assert not changed, changed
    # and it measured: builds at steps 0 and 2, both calls of the timed steps, the profiled last step
    assert [b["step"] for b in rec.builds] == [0, 2] and all(b["seconds"] > 0 for b in rec.builds)
    assert [s["step"] for s in rec.steps] == [1, 2, 3]
    assert all(s["project_grad_s"] > 0 and s["project_step_s"] > 0 for s in rec.steps[:2])
    assert rec.steps[2]["project_grad_s"] is None and rec.profile["ok"]
    assert rec.steps[2]["project_step_s"] is None and rec.profile_step["events"] > 0  # profiled, not timed
