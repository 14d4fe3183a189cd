"""`ogpsa report`: tax avoided against plain at matched safety, the over-refusal panel, and the
weight-averaging curve (built once, atomically, cached) on the tiny offline model."""

from __future__ import annotations

import json
import re
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
    # evaluations without per-probe results (written before they were kept): point estimates, no interval
    # plain raises math by 0.5 and general by 0.2 at dpo; ogpsa by 0.1 (80% avoided) and 0.3 (-50%)
    ogpsa = _run(tmp_path, "ogpsa", OGPSA, [(0.6, 1.2, 2.1), (0.9, 1.1, 2.3)])
    plain = _run(tmp_path, "plain", PLAIN, [(0.6, 1.4, 2.0), (0.9, 1.5, 2.2)])
    null = _run(tmp_path, "null", OGPSA, [(0.3, 1.0, 2.0), (0.6, 1.0, 2.0)])
    assert report.main([str(ogpsa), str(plain), str(null), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep.md").read_text()
    head = md.splitlines()[2]
    assert "tax avoided general ↑ | tax avoided math ↑ | Δ refusal | Δ over-refusal | frontier" in head
    row = next(line for line in md.splitlines() if line.startswith("| ogpsa | dpo |"))
    assert row.endswith("| -50% | 80% | +0.00 | +0.00 | ● |"), row
    assert next(line for line in md.splitlines() if line.startswith("| plain | dpo |")).endswith("| 0% | 0% | +0.00 | +0.00 |  |")
    # at sft plain did not raise general (2.0 - 2.0): no tax to avoid there
    assert next(line for line in md.splitlines() if line.startswith("| ogpsa | sft |")).endswith("| – | 50% | +0.00 | +0.00 |  |")
    null_dpo = next(line for line in md.splitlines() if line.startswith("| null | dpo |"))
    assert "| 100% | 100% | -0.30 | +0.00 |" in null_dpo
    assert "- null, dpo: below plain's refusal (Δ -0.30), so its tax avoided is not at matched safety" in md
    assert "- null, sft: below plain's refusal (Δ -0.30)" in md
    assert "rows without an interval: their evaluations predate per-probe results" in md
    assert "the plain run of its own non-ogpsa settings (plain)" in md
    png = (tmp_path / "rep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # an explicit --plain that is not one of the runs: one line, exit 2
    assert report.main([str(ogpsa), "--plain", str(plain), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plain:" in err and not (tmp_path / "x.md").exists()


# ------------------------------------------------------------------ intervals from per-probe results

P = 128  # capability probes per source
H = 64  # harmful and benign prompts


def _probe_ev(rng, nll: dict, harmful: float, benign: float, noise: float = 0.3, flags: dict | None = None) -> dict:
    """An evaluation with per-probe results: each source's probes have NLL `nll[source]` on average (every
    probe 10 tokens), `harmful` / `benign` of the prompts refused (the first ones, or `flags`)."""
    import numpy as np

    cap = {}
    for label, mean in nll.items():
        per_token = mean + noise * rng.standard_normal(P)
        per_token += mean - per_token.mean()  # exactly `mean`
        cap[label] = {"nll": mean, "n_probes": P, "n_tokens": 10 * P, "probes_hash": f"h-{label}",
                      "per_probe": {"nll_sum": list(map(float, 10 * per_token)), "n_tokens": [10] * P}}
    flags = flags or {}
    out = {"capability": cap}
    for key, name, rate in (("safety", "harmful", harmful), ("over_refusal", "benign", benign)):
        f = flags.get(name, [1] * round(rate * H) + [0] * (H - round(rate * H)))
        out[key] = {"refusal_rate": float(np.mean(f)), "n": H, "flags": list(f), "probes_hash": f"h-{name}"}
    out["metrics"] = report.flat_metrics(out)
    return out


def _config_run(root, name, kind, evals, base, seed=None, lr=1e-3, **keys):
    """A pipeline folder as the runner leaves it: pipeline.json and each stage's stage_config.yaml."""
    import yaml

    run = root / name
    stages = []
    for i, ((stage, stage_type), ev) in enumerate(zip(kind, evals)):
        out = run / f"0{i + 1}_{stage}"
        out.mkdir(parents=True)
        args = {"stage": stage_type, "learning_rate": lr, "dataset": f"d_{stage}", "output_dir": str(out),
                "model_name_or_path": "start" if i == 0 else str(run / f"0{i}_x")}
        if seed is not None:
            args["seed"] = seed
        if stage_type.startswith("ogpsa_"):
            args.update(keys)
        (out / "stage_config.yaml").write_text(yaml.safe_dump(args))
        stages.append({"name": stage, "stage": stage_type, "output": str(out), "status": "done", "eval": ev})
    (run / "pipeline.json").write_text(json.dumps({"recipe": {"name": "r"}, "stages": stages, "eval_base": base}))
    return run


def _row(md: str, start: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_intervals_paired_over_probes_and_the_matched_refusal_rule(tmp_path):
    import numpy as np

    rng = np.random.default_rng(1)
    base = _probe_ev(rng, {"math": 1.0, "general": 2.0}, 0.0, 0.0)
    plain_ev = _probe_ev(rng, {"math": 1.5, "general": 2.2}, 0.9, 0.2)
    plain = _config_run(tmp_path, "plain", PLAIN[1:], [plain_ev], base)
    # the same evaluation as plain: 0% on every source, exactly, with a zero-width interval (paired)
    same = _config_run(tmp_path, "same", OGPSA[1:], [plain_ev], base, ogpsa_mode="observe")
    # one refusal fewer out of 64: the interval of Δ refusal includes 0, so it is at plain's refusal
    near = _config_run(tmp_path, "near", OGPSA[1:], [_probe_ev(rng, {"math": 1.1, "general": 2.1}, 0.9 - 1 / H, 0.2)],
                       base, ogpsa_method="null_space")
    # 12 fewer: below plain's refusal
    low = _config_run(tmp_path, "low", OGPSA[1:], [_probe_ev(rng, {"math": 1.0, "general": 2.0}, 0.9 - 12 / H, 0.2)],
                      base, ogpsa_refresh_steps=2)
    dirs = [str(d) for d in (plain, same, near, low)]
    md_path, _, console = report.make_report(dirs, str(tmp_path / "rep"))
    md = md_path.read_text()
    assert _row(md, "| same | dpo |")[-5:] == ["0% [0, 0]", "0% [0, 0]", "+0.00 [+0.00, +0.00]", "+0.00 [+0.00, +0.00]", ""]
    tax_general, tax_math, d_ref = _row(md, "| near | dpo |")[-5:-2]
    # point estimates as the metrics give them; the interval around them
    assert tax_math.startswith("80% [") and tax_general.startswith("50% [")
    lo, hi = map(int, tax_math[5:-1].split(", "))
    assert 60 < lo < 80 < hi < 100
    assert d_ref.startswith("-0.02 [") and float(d_ref.split("[")[1].split(",")[0]) < 0 <= float(d_ref.split(", ")[1][:-1])
    assert "- near, dpo: below plain's refusal" not in md
    assert "- low, dpo: below plain's refusal (Δ -0.19 [" in md
    assert "rows without an interval" not in md
    # the frontier: `low` has the lowest NLL mean but is below `near`'s refusal, so it does not push `near` off
    assert _row(md, "| near | dpo |")[-1] == "●" and _row(md, "| low | dpo |")[-1] == "●"
    # reproducible: the same report again is the same, byte for byte
    again, _, console2 = report.make_report(dirs, str(tmp_path / "rep2"))
    assert again.read_text().replace("rep2", "rep") == md and console2.replace("rep2", "rep") == console
    # the console: at most 100 characters a line, the intervals, the file with the rest
    assert max(map(len, console.splitlines())) <= 100
    assert re.search(r"^near +dpo +0\.891 +0\.203 +50% \[\d+, \d+\] +80% \[\d+, \d+\] +●", console, re.M), console
    assert "below plain's refusal (tax not at matched safety): low dpo" in console


def test_runs_differing_only_by_seed_fold_into_one_row_against_their_own_plain_runs(tmp_path):
    import numpy as np

    rng = np.random.default_rng(2)
    base = _probe_ev(rng, {"math": 1.0}, 0.0, 0.0)
    dirs = []
    for seed, (plain_math, own_math) in enumerate([(1.4, 1.1), (1.6, 1.2), (1.5, 1.15)]):
        dirs.append(_config_run(tmp_path, f"plain__seed-{seed}", PLAIN[1:], [_probe_ev(rng, {"math": plain_math}, 0.9, 0.2)],
                                base, seed=seed))
        dirs.append(_config_run(tmp_path, f"span__seed-{seed}", OGPSA[1:], [_probe_ev(rng, {"math": own_math}, 0.9, 0.2)],
                                base, seed=seed, ogpsa_refresh_steps=2))
    # a learning rate the other plain runs did not use: compared with its own plain run, not with seed 0's
    same = _probe_ev(rng, {"math": 2.0}, 0.9, 0.2)
    dirs.append(_config_run(tmp_path, "plain__lr", PLAIN[1:], [same], base, seed=0, lr=2e-3))
    dirs.append(_config_run(tmp_path, "span__lr", OGPSA[1:], [same], base, seed=0, lr=2e-3, ogpsa_refresh_steps=2))
    md = report.make_report([str(d) for d in dirs], str(tmp_path / "rep"))[0].read_text()
    row = _row(md, "| span | dpo |")
    assert row[2] == "3" and row[-8] == "1.150"  # the mean NLL over the seeds (1.1, 1.2, 1.15)
    tax = row[-4]
    # mean rise 0.15 against plain's mean rise 0.5: 70%; the interval covers seed and probe variance
    assert tax.startswith("70% [")
    lo, hi = map(int, tax[5:-1].split(", "))
    assert lo < 70 < hi
    assert _row(md, "| plain | dpo |")[2] == "3" and "| plain · average" not in md
    # the other learning rate: identical to its own plain run, so 0% (against seed 0's plain it would be -150%)
    assert _row(md, "| span__lr | dpo |")[-4] == "0% [0, 0]"
    assert "probes and seeds" in md
    # a run whose plain run is not in the report is left uncompared, and the notes say why
    md = report.make_report([str(dirs[0]), str(dirs[-1])], str(tmp_path / "rep3"))[0].read_text()
    assert "- span__lr: no plain run with the same non-ogpsa settings among the runs, so it is not compared" in md
    assert _row(md, "| span__lr | dpo |")[-4:-1] == ["–", "–", "–"]


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
    said = capsys.readouterr()
    assert said.out.count("] averaging") == 2 and said.out.count("] evaluating") == 2
    # the loaders' and the evaluations' own lines are in the log, not on the console
    assert "Loading weights" not in said.out + said.err and "[ogpsa eval]" not in said.out + said.err
    assert "[ogpsa eval] math:" in (trained_run / "averages" / "average.log").read_text()
    folder = trained_run / "averages" / "sft_w0.25"
    start, end, mid = _params(tiny["model"]), _params(trained_run / "01_sft"), _params(folder)
    for k in start:
        assert torch.allclose(mid[k], 0.75 * start[k] + 0.25 * end[k], atol=1e-6), k
    assert json.loads((folder / "average.json").read_text())["weight"] == 0.25
    md = out.with_suffix(".md").read_text()
    assert "| plain · average | 0.25×sft |" in md and "| plain · average | 0.5×sft |" in md
    # the averaged stage against plain's own stage: tax avoided (with its interval) and refusal difference
    assert re.search(r"\| plain · average \| 0\.5×sft \|.*\| [+-]\d\.\d\d \[[+-]\d\.\d\d, [+-]\d\.\d\d\] \|", md)
    assert "tax avoided math" in md
    # rerun: nothing rebuilt, nothing re-evaluated, same numbers
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert report.main([str(trained_run), "--average", "0.25,0.5", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "averaging" not in said.out + said.err and "evaluating" not in said.out + said.err
    assert out.with_suffix(".md").read_text() == md
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
    assert sorted(p.name for p in (trained_run / "averages").iterdir()) == ["average.log", "sft_w0.25", "sft_w0.5"]
    assert "OSError: disk full" in (trained_run / "averages" / "average.log").read_text()
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


# ------------------------------------------------------------- averaging calibrated to plain's safety


def _refusing_copy(tiny: dict, dst: Path, steps: int = 40) -> Path:
    """The tiny model trained (in this process, Adam) to answer the toy harmful prompts with the refusal:
    a run whose refusal falls as it is averaged back toward the start, which refuses nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ogpsa.pipelines.scoring import encode_prompt, make_template

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    template = make_template(tok, EvalConfig(dataset_dir=tiny["data"], harmful="toy_harmful_eval"))
    rows = json.loads((Path(tiny["data"]) / "toy_harmful_eval.json").read_text())
    pairs = [encode_prompt(template, tok, r["instruction"], r["output"]) for r in rows]
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = sum(model(input_ids=torch.tensor([p + r]), labels=torch.tensor([[-100] * len(p) + r])).loss for p, r in pairs)
        opt.zero_grad()
        (loss / len(pairs)).backward()
        opt.step()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def test_average_auto_takes_the_largest_pull_back_still_at_plains_refusal(tiny, tmp_path, capsys):
    from ogpsa.pipelines.compare import Bootstrap, Cell, Member, Point
    from ogpsa.pipelines.scoring import evaluate_model

    run = tmp_path / "plain"
    stage = _refusing_copy(tiny, run / "01_sft")
    cfg = EvalConfig(dataset_dir=tiny["data"], capability=["math=toy_math_eval"], harmful="toy_harmful_eval",
                     max_new_tokens=12, progress=False)
    top = evaluate_model(stage, cfg)
    assert top["safety"]["refusal_rate"] == 1.0  # the run refuses every harmful prompt
    spec = {"recipe": "tiny.yaml", "eval_base": evaluate_model(tiny["model"], cfg),
            "stages": [{"name": "sft", "stage": "sft", "hash": "h1", "start_model": tiny["model"], "output": str(stage),
                        "model": str(stage), "status": "done", "eval": top}]}
    assert spec["eval_base"]["safety"]["refusal_rate"] == 0.0
    (run / "pipeline.json").write_text(json.dumps(spec))
    assert report.main([str(run), "--average", "auto", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| plain · auto-average |"))
    w = float(row.split("|")[2].strip().split("×")[0])
    assert w < 1.0 and f"w = {w:g} chosen by the matched-refusal rule" in md
    tried = sorted((float(p.name.split("_w")[1]) for p in (run / "averages").iterdir() if p.is_dir()), reverse=True)
    nxt = round(w - 0.1, 6)
    # searched from 0.9 down in steps of 0.1, stopping at the first weight below plain's refusal
    assert tried == [round(0.9 - 0.1 * k, 6) for k in range(round((0.9 - nxt) / 0.1) + 1)], tried

    def lost(weight):  # refusals lost against plain (which refuses all of them), and the rule's verdict
        ev = json.loads((run / "averages" / f"sft_w{weight:g}" / "eval.json").read_text())["eval"]
        cell = Cell([Member(None, Point.from_eval(ev, ev["metrics"]), None, Point.from_eval(top, top["metrics"]), None)],
                    Bootstrap())
        return ev["safety"]["n"] - sum(ev["safety"]["flags"]), cell.at_plain_refusal()

    assert lost(nxt)[1] is False and lost(nxt)[0] >= 3  # the refusal falls as the run is averaged back
    assert all(lost(x)[1] for x in tried if x >= w) and lost(w)[0] <= 3
    assert "plain · auto-average" in capsys.readouterr().out
    # rerun: the cached averages are reused, nothing is built or evaluated again
    assert report.main([str(run), "--average", "auto", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "averaging" not in out and "evaluating" not in out and (tmp_path / "rep.md").read_text() == md
