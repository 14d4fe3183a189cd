"""benchmarks/gpu_session.sh, the GPU acceptance run, rehearsed on CPU (GPU_REHEARSAL=cpu): every part's
outcome lands in $OUT in the few files the device tool returns, and a failing part stops nothing."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
FILES = {"summary.md", "manifest.json", "checks.json", "tests.xml", "bench.json", "logs.tar.gz"}


def rehearse(tmp_path, parts: str, **env) -> tuple[subprocess.CompletedProcess, Path, dict]:
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "GPU_REHEARSAL": "cpu", "OUT": str(out), "GPU_WORK": str(tmp_path / "work"),
             "GPU_PYTHON": sys.executable, "GPU_PARTS": parts, "OMP_NUM_THREADS": "1", **env})
    manifest = json.loads((out / "manifest.json").read_text())
    return proc, out, manifest


def check_returned_files(out: Path) -> None:
    """What the device tool brings back: at most 8 plain files, names of letters, digits, '.', '_', '-'."""
    names = {p.name for p in out.iterdir()}
    assert names == FILES and all(p.is_file() for p in out.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


@pytest.mark.parametrize("script", ["gpu_session.sh", "gpu_wheels.sh"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_failed_and_skipped_parts_are_recorded_and_the_run_goes_on(tmp_path):
    """No wheels: install fails with its one line; zero3's cap is under the minimum: skipped, not run."""
    proc, out, manifest = rehearse(tmp_path, "install,zero3", GPU_WHEELS=str(tmp_path / "none"), GPU_CAP_zero3="5")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a failed part fails the run, after all parts
    check_returned_files(out)
    parts = {p["name"]: p for p in manifest["parts"]}
    assert list(parts) == ["install", "zero3"]
    assert parts["install"]["status"] == "failed" and parts["install"]["rc"] == 1
    assert "no wheels in" in parts["install"]["reason"] and "gpu_wheels.sh" in parts["install"]["reason"]
    assert parts["zero3"]["status"] == "skipped" and parts["zero3"]["reason"].startswith("budget:")
    assert manifest["complete"] is True and manifest["run"]["rehearsal"] == "cpu"
    summary = (out / "summary.md").read_text()
    assert "CPU rehearsal" in summary and "| install | failed |" in summary and "| zero3 | skipped |" in summary
    assert summary.strip() in proc.stdout  # printed last, where the device tool's output tail shows it
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/install.log" in names and "parts.jsonl" in names and "logs/zero3.log" not in names


@pytest.mark.long  # a rehearsal with a benchmark part (minutes)
def test_rehearsal_runs_facts_and_a_benchmark_after_a_planted_failure(tmp_path):
    """A planted failure first, then the facts and a (tiny, CPU) benchmark part still run and report."""
    proc, out, manifest = rehearse(tmp_path, "install,facts,bench_500m_update", GPU_FAIL_PART="install")
    check_returned_files(out)
    parts = {p["name"]: p for p in manifest["parts"]}
    assert parts["install"]["status"] == "failed" and "planted failure" in parts["install"]["reason"]
    assert parts["facts"]["status"] == "ok", parts["facts"]
    facts = manifest["facts"]
    assert facts["device"] == "skipped: no CUDA" and facts["requirement_problems"] == []
    assert set(facts["imports"].values()) == {"ok"}
    assert parts["bench_500m_update"]["status"] == "ok", parts["bench_500m_update"]
    bench = json.loads((out / "bench.json").read_text())["bench_500m_update"]
    assert bench["complete"] and bench["settings"]["grad_accum"] == 2 and bench["settings"]["target"] == "update"
    rows = bench["summary"]
    # both methods in this part: the null space's step time and build beside the gradient span's
    assert [(r["stage"], r["method"]) for r in rows] == [("sft", "gradient_span"), ("sft", "null_space"),
                                                        ("dpo", "gradient_span"), ("dpo", "null_space")]
    assert all(r["dtoh_per_step"] is None for r in rows)  # no CUDA: no device-to-host reads to count
    assert all(isinstance(r["pass_memory"], bool) and r["peak_bound_mb"] > r["peak_plain_mb"] for r in rows)
    assert "## bench_500m_update" in (out / "summary.md").read_text()
