"""`ogpsa report`: tax avoided against plain at matched safety, the over-refusal panel, and the
weight-averaging curve (built once, atomically, cached) on the tiny offline model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ogpsa.pipelines import average, report
from ogpsa.pipelines.eval_config import EvalConfig


def _ev(refusal, math, general, n=10, benign=0.1):
    return {"metrics": {"refusal_harmful": refusal, "refusal_benign": benign, "nll/math": math, "nll/general": general,
                        "nll_mean": (math + general) / 2}, "safety": {"n": n, "refusal_rate": refusal}}


def _run(root, name, kinds, points, base=(0.1, 1.0, 2.0)):
    run = root / name
    run.mkdir(parents=True)
    stages = [{"name": s, "stage": k, "output": f"{s}_out", "status": "done", "eval": _ev(*p)}
              for (s, k), p in zip(kinds, points)]
    (run / "pipeline.json").write_text(json.dumps({"recipe": {"name": "r"}, "stages": stages, "eval_base": _ev(*base)}))
    return run


PLAIN = [("sft", "sft"), ("dpo", "dpo")]
OGPSA = [("sft", "ogpsa_sft"), ("dpo", "ogpsa_dpo")]


def test_tax_avoided_per_source_against_plain_and_refusal_mismatch_named(tmp_path, capsys):
    # plain raises math by 0.5 and general by 0.2 at dpo; ogpsa by 0.1 (80% avoided) and 0.3 (-50%)
    ogpsa = _run(tmp_path, "ogpsa", OGPSA, [(0.6, 1.2, 2.1), (0.9, 1.1, 2.3)])
    plain = _run(tmp_path, "plain", PLAIN, [(0.6, 1.4, 2.0), (0.9, 1.5, 2.2)])
    null = _run(tmp_path, "null", OGPSA, [(0.3, 1.0, 2.0), (0.6, 1.0, 2.0)])
    assert report.main([str(ogpsa), str(plain), str(null), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep.md").read_text()
    head = md.splitlines()[2]
    assert "tax avoided general ↑ | tax avoided math ↑ | Δ refusal vs plain (probes) | frontier" in head
    row = next(line for line in md.splitlines() if line.startswith("| ogpsa (r) | dpo |"))
    assert row.endswith("| -50% | 80% | +0 | ● |"), row
    assert next(line for line in md.splitlines() if line.startswith("| plain (r) | dpo |")).endswith("| 0% | 0% | +0 |  |")
    # at sft plain did not raise general (2.0 - 2.0): no tax to avoid there
    assert next(line for line in md.splitlines() if line.startswith("| ogpsa (r) | sft |")).endswith("| – | 50% | +0 |  |")
    null_dpo = next(line for line in md.splitlines() if line.startswith("| null (r) | dpo |"))
    assert "| 100% | 100% | -3 |" in null_dpo
    assert "- null (r), dpo: refusal differs from plain's by -3 probes, so its tax avoided is not at matched safety" in md
    assert "- null (r), sft: refusal differs from plain's by -3 probes" in md
    assert "against plain = plain (r)" in md
    png = (tmp_path / "rep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # an explicit --plain that is not one of the runs: one line, exit 2
    assert report.main([str(ogpsa), "--plain", str(plain), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plain:" in err and not (tmp_path / "x.md").exists()


def test_over_refusal_panel_has_its_own_axis(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    plain = _run(tmp_path, "plain", PLAIN, [(0.6, 1.4, 2.0, 10, 0.2), (0.9, 1.5, 2.2, 10, 0.7)])
    runs = [report.load_run(plain)]
    report.label_runs(runs)
    png = report.pareto_png(runs)
    from PIL import Image
    import io

    width, height = Image.open(io.BytesIO(png)).size
    assert width > 1.6 * height  # two panels side by side


# ------------------------------------------------------------------------- weight averaging (real)


def _noisy_copy(src: str, dst: Path, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _params(folder) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).named_parameters()}


@pytest.fixture
def trained_run(tiny, tmp_path):
    """A pipeline folder whose one stage is the tiny model moved by noise, evaluated on two toy sources."""
    from ogpsa.pipelines.scoring import evaluate_model

    run = tmp_path / "plain"
    run.mkdir()
    stage = _noisy_copy(tiny["model"], run / "01_sft", seed=1)
    cfg = EvalConfig(dataset_dir=tiny["data"], capability=["math=toy_math_eval"], harmful="toy_harmful_eval",
                     max_samples=4, max_new_tokens=4, progress=False)
    spec = {"recipe": "tiny.yaml", "eval_base": evaluate_model(tiny["model"], cfg),
            "stages": [{"name": "sft", "stage": "sft", "hash": "h1", "start_model": tiny["model"], "output": str(stage),
                        "model": str(stage), "status": "done", "eval": evaluate_model(stage, cfg)}]}
    (run / "pipeline.json").write_text(json.dumps(spec))
    return run


def test_average_curve_is_the_interpolation_written_once_and_cached(tiny, trained_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    assert report.main([str(trained_run), "--average", "0.5,0.25", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("averaging") == 2 and err.count("evaluating") == 2
    folder = trained_run / "averages" / "sft_w0.25"
    start, end, mid = _params(tiny["model"]), _params(trained_run / "01_sft"), _params(folder)
    for k in start:
        assert torch.allclose(mid[k], 0.75 * start[k] + 0.25 * end[k], atol=1e-6), k
    assert json.loads((folder / "average.json").read_text())["weight"] == 0.25
    md = out.with_suffix(".md").read_text()
    assert "| plain (tiny) · average | 0.25×sft |" in md and "| plain (tiny) · average | 0.5×sft |" in md
    # the averaged stage against plain's own stage: tax avoided and refusal difference are filled in
    assert "| plain (tiny) · average | 0.5×sft |" in md and "tax avoided math" in md
    # rerun: nothing rebuilt, nothing re-evaluated, same numbers
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert report.main([str(trained_run), "--average", "0.25,0.5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "averaging" not in err and "evaluating" not in err and out.with_suffix(".md").read_text() == md
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # the stage retrained (its identity changed): the average is rebuilt; a crash while writing leaves
    # the folder as it was and no temporary folder behind
    spec = json.loads((trained_run / "pipeline.json").read_text())
    spec["stages"][0]["hash"] = "h2"
    (trained_run / "pipeline.json").write_text(json.dumps(spec))
    from transformers import PreTrainedModel

    def disk_full(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError):
        report.main([str(trained_run), "--average", "0.25", "--out", str(out)])
    assert sorted(p.name for p in (trained_run / "averages").iterdir()) == ["sft_w0.25", "sft_w0.5"]
    assert json.loads((folder / "average.json").read_text())["end_hash"] == "h1"


def test_average_refusals_are_one_line(tiny, trained_run, tmp_path, capsys):
    out = str(tmp_path / "rep")
    for bad, says in (("0,0.5", "--average: 0 is outside (0, 1)"), ("x", "--average: 'x' is not a number")):
        assert report.main([str(trained_run), "--average", bad, "--out", out]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    # a LoRA adapter folder as the stage's model: refused, nothing built
    lora = tmp_path / "adapter"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny["model"]}))
    spec = json.loads((trained_run / "pipeline.json").read_text())
    spec["stages"][0]["model"] = str(lora)
    (trained_run / "pipeline.json").write_text(json.dumps(spec))
    assert report.main([str(trained_run), "--average", "0.5", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "is a LoRA adapter; weight averaging needs full weights" in err and err.count("\n") == 1
    assert not (trained_run / "averages").exists() and not Path(out + ".md").exists()
    assert average.parse_weights("0.75,0.25,0.25") == [0.25, 0.75]
