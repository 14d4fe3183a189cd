"""`ogpsa data saferlhf|refsets|tiny` on small fixtures written in the real schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ogpsa.data_prep.cli import main

HARM_KEYS = [f"Category {i}" for i in range(19)]
REFUSAL = "I cannot help with that request."


# ---------------------------------------------------------------------------------------------
# Fixtures in the real schemas


def harm(*flags: int) -> dict[str, bool]:
    return {k: i in flags for i, k in enumerate(HARM_KEYS)}


def safe_row(prompt, r0, s0, r1, s1, better, safer, sev=(0, 0), cats=((), ())):
    """One PKU-SafeRLHF row in the current schema (source, harm-category and severity columns)."""
    return {
        "prompt": prompt,
        "response_0": r0,
        "response_1": r1,
        "prompt_source": "Alpaca3-70B",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca2-7B",
        "is_response_0_safe": s0,
        "is_response_1_safe": s1,
        "response_0_harm_category": harm(*cats[0]),
        "response_1_harm_category": harm(*cats[1]),
        "response_0_severity_level": sev[0],
        "response_1_severity_level": sev[1],
        "better_response_id": better,
        "safer_response_id": safer,
    }


def saferlhf_rows() -> list[dict]:
    rows = [
        # A: one safe, one unsafe -> target/chosen = the safe one, rejected = the unsafe one
        safe_row(
            "How do I pick a lock?",
            "Insert a tension wrench...",
            False,
            "Call a locksmith.",
            True,
            0,
            1,
            sev=(2, 0),
            cats=((0, 3), ()),
        ),
        # A again after whitespace/case normalisation: collapses (first row wins)
        safe_row("  how do I  PICK a lock? ", "Use a bobby pin.", False, "Ask the owner.", True, 1, 1, sev=(1, 0)),
        # B: both unsafe; severity says response_0 is worse, safer_response_id says response_1 is
        safe_row(
            "How can I hurt my neighbour?",
            "Poison the dog.",
            False,
            "Yell at him.",
            False,
            1,
            0,
            sev=(3, 1),
            cats=((5,), (6,)),
        ),
        # C: both safe -> not harmful, skipped
        safe_row("What is the capital of France?", "Paris.", True, "It is Paris.", True, 1, 0),
        # D: both unsafe, no refusal available -> dropped
        safe_row(
            "How do I forge a cheque?",
            "Copy the signature.",
            False,
            "Use a scanner.",
            False,
            0,
            0,
            sev=(2, 2),
            cats=((7,), (7,)),
        ),
        # E: harmful through its second row; its first row has two safe answers -> better_response_id picks
        safe_row("Tell me about explosives.", "They are regulated.", True, "Ask a chemist.", True, 1, 1),
        safe_row("Tell me about explosives.", "Mix these...", False, "Buy these...", False, 0, 1, sev=(3, 2)),
    ]
    for i in range(20):  # plain one-safe/one-unsafe prompts to fill the splits
        rows.append(
            safe_row(
                f"Harmful request number {i}?",
                f"Bad answer {i}.",
                False,
                f"Safe answer {i}.",
                True,
                1,
                1,
                sev=(1, 0),
                cats=((2,), ()),
            )
        )
    return rows


def legacy(rows: list[dict]) -> list[dict]:
    """The older schema: no source, harm-category or severity columns."""
    drop = ("_source", "_harm_category", "_severity_level")
    return [{k: v for k, v in r.items() if not k.endswith(drop)} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def gsm8k_rows(n: int = 30) -> list[dict]:
    return [
        {
            "question": f"Ann has {i} apples and buys {i + 2} more. How many now?",
            "answer": f"Ann has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}",
        }
        for i in range(n)
    ]


def alpaca_rows(n: int = 30) -> list[dict]:
    rows = [
        {"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else f"ctx {i}", "output": f"Blue {i}."}
        for i in range(n)
    ]
    return rows + [dict(rows[0])]  # one exact duplicate


def hhh_folder(root: Path) -> Path:
    """BIG-bench layout: hhh_alignment/{harmless,honest}/task.json; one prompt repeated."""
    tasks = {
        "harmless": [("How do I hurt someone?", "I won't help with that.", "Hit them.")] * 2
        + [(f"Harmless question {i}?", f"Kind answer {i}.", f"Rude answer {i}.") for i in range(6)],
        "honest": [(f"Honest question {i}?", f"True answer {i}.", f"False answer {i}.") for i in range(6)],
    }
    for name, items in tasks.items():
        examples = [{"input": q, "target_scores": {good: 1, bad: 0}} for q, good, bad in items]
        task = {
            "name": f"hhh_alignment:{name}",
            "description": "x",
            "keywords": [],
            "metrics": ["multiple_choice_grade"],
            "preferred_score": "multiple_choice_grade",
            "examples": examples,
        }
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "task.json").write_text(json.dumps(task, indent=2), encoding="utf-8")
    return root


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    return {
        "current": write_jsonl(src / "saferlhf.jsonl", saferlhf_rows()),
        "refusals": write_jsonl(
            src / "refusals.jsonl", [{"prompt": "how can i hurt my NEIGHBOUR?", "refusal": REFUSAL}]
        ),
        "gsm8k": write_jsonl(src / "gsm8k" / "train.jsonl", gsm8k_rows()),
        "alpaca": _write_json(src / "alpaca" / "alpaca.json", alpaca_rows()),
        "hhh": hhh_folder(src / "hhh_alignment"),
    }


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    return path


def saferlhf(out: Path, source: Path, *extra: str) -> int:
    return main(["saferlhf", "--out", str(out), "--source", str(source), "--eval-size", "3", "--seed", "1", *extra])


def refsets(out: Path, s: dict[str, Path], *extra: str) -> int:
    return main(
        [
            "refsets",
            "--out",
            str(out),
            "--gsm8k",
            str(s["gsm8k"]),
            "--alpaca",
            str(s["alpaca"]),
            "--hhh",
            str(s["hhh"]),
            "--n",
            "10",
            *extra,
        ]
    )


def by_prompt(rows: list[dict]) -> dict[str, dict]:
    return {r["instruction"]: r for r in rows}


# ---------------------------------------------------------------------------------------------
# saferlhf


def test_saferlhf_current_schema_choices_and_counts(tmp_path, sources):
    out = tmp_path / "out"
    assert saferlhf(out, sources["current"], "--refusals", str(sources["refusals"]), "--eval-size", "0") == 0
    sft, dpo = by_prompt(read(out / "saferlhf_sft.json")), by_prompt(read(out / "saferlhf_dpo.json"))
    assert read(out / "saferlhf_eval.json") == []
    assert sft["How do I pick a lock?"] == {
        "instruction": "How do I pick a lock?",
        "input": "",
        "output": "Call a locksmith.",
    }
    assert dpo["How do I pick a lock?"]["chosen"] == "Call a locksmith."
    assert dpo["How do I pick a lock?"]["rejected"] == "Insert a tension wrench..."
    # both unsafe: refusal fallback; rejected = highest severity (response_0), not the safer_response_id rule
    assert sft["How can I hurt my neighbour?"]["output"] == REFUSAL
    assert dpo["How can I hurt my neighbour?"] == {
        "instruction": "How can I hurt my neighbour?",
        "input": "",
        "chosen": REFUSAL,
        "rejected": "Poison the dog.",
    }
    # both-safe row of a harmful prompt: better_response_id picks; rejected from its unsafe row (severity 3)
    assert dpo["Tell me about explosives."]["chosen"] == "Ask a chemist."
    assert dpo["Tell me about explosives."]["rejected"] == "Mix these..."
    assert "What is the capital of France?" not in sft and "How do I forge a cheque?" not in sft
    assert set(sft) == set(dpo) and len(sft) == 23
    stats = read(out / "saferlhf_stats.json")
    c = stats["counts"]
    assert (c["rows_read"], c["unique_prompts"], c["duplicate_rows_collapsed"]) == (27, 25, 2)
    assert (c["skipped_no_unsafe_response"], c["harmful_prompts"], c["dropped_no_target"]) == (1, 24, 1)
    assert (c["target_safe_response"], c["target_refusal"], c["rows_with_severity"]) == (22, 1, 27)
    assert stats["harm_categories"]["saferlhf_sft"] == {
        "Category 0": 1,
        "Category 2": 20,
        "Category 3": 1,
        "Category 5": 1,
        "Category 6": 1,
    }
    assert stats["files"]["saferlhf_dpo"]["rows"] == 23
    info = read(out / "dataset_info.json")
    assert info["saferlhf_sft"] == {"file_name": "saferlhf_sft.json"}
    assert info["saferlhf_dpo"] == {
        "file_name": "saferlhf_dpo.json",
        "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
    }


def test_saferlhf_legacy_schema_from_parquet(tmp_path, sources):
    rows = legacy(saferlhf_rows())
    src = tmp_path / "legacy"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:10]), src / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), src / "train-00001.parquet")
    out = tmp_path / "out"
    assert saferlhf(out, src, "--eval-size", "0") == 0  # a folder of parquet shards, no refusals
    dpo = by_prompt(read(out / "saferlhf_dpo.json"))
    assert "How can I hurt my neighbour?" not in dpo  # no safe response, no refusal: dropped
    assert dpo["How do I pick a lock?"]["rejected"] == "Insert a tension wrench..."
    c = read(out / "saferlhf_stats.json")["counts"]
    assert (c["dropped_no_target"], c["rows_without_severity"], c["duplicate_rows_collapsed"]) == (2, 27, 2)
    # with a refusal, severity absent: rejected = the response that is not safer_response_id
    out2 = tmp_path / "out2"
    assert saferlhf(out2, src, "--eval-size", "0", "--refusals", str(sources["refusals"])) == 0
    assert by_prompt(read(out2 / "saferlhf_dpo.json"))["How can I hurt my neighbour?"]["rejected"] == "Yell at him."


def test_saferlhf_sizes_eval_disjoint_and_reproducible(tmp_path, sources):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    args = ("--sft-size", "8", "--dpo-size", "6", "--eval-size", "5")
    assert saferlhf(a, sources["current"], *args) == 0
    assert saferlhf(b, sources["current"], *args) == 0
    assert snapshot(a) == snapshot(b)  # byte-identical
    sft, dpo, ev = (read(a / f"saferlhf_{n}.json") for n in ("sft", "dpo", "eval"))
    assert (len(sft), len(dpo), len(ev)) == (8, 6, 5)
    train = {r["instruction"] for r in sft + dpo}
    assert not train & {r["instruction"] for r in ev}
    assert {r["instruction"] for r in dpo} <= {r["instruction"] for r in sft}  # same pool: DPO prompts within SFT's
    assert all(set(r) == {"instruction", "input", "output", "harm_categories"} for r in ev)
    assert saferlhf(c, sources["current"], *args, "--seed", "2", "--disjoint-sft-dpo") == 0
    sft2, dpo2 = read(c / "saferlhf_sft.json"), read(c / "saferlhf_dpo.json")
    assert not {r["instruction"] for r in sft2} & {r["instruction"] for r in dpo2}
    assert snapshot(a) != snapshot(c)


@pytest.mark.parametrize(
    "mutate, column",
    [
        (lambda r: r.pop("is_response_1_safe"), "is_response_1_safe"),
        (lambda r: r.update(is_response_0_safe="yes"), "is_response_0_safe"),
        (lambda r: r.update(response_0_severity_level=7), "response_0_severity_level"),
        (lambda r: r.update(safer_response_id=2), "safer_response_id"),
        (lambda r: r.update(prompt=None), "prompt"),
    ],
)
def test_saferlhf_bad_column(tmp_path, capsys, mutate, column):
    rows = saferlhf_rows()
    mutate(rows[4])
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    assert saferlhf(out, src) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and f"'{column}'" in err and "row 5" in err
    assert not out.exists()


def test_saferlhf_bad_sources(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x"\n')
    for src, words in ((empty, "no rows"), (broken, "invalid JSON"), (tmp_path / "missing.parquet", "no such file")):
        assert saferlhf(out, src) == 2
        err = capsys.readouterr().err
        assert str(src) in err and words in err
    assert not out.exists()


def test_saferlhf_hub_offline_fails_cleanly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ogpsa.data_prep.cli", "saferlhf", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "PKU-Alignment/PKU-SafeRLHF" in proc.stderr and "local" in proc.stderr
    assert not out.exists()


def test_dataset_info_merge_conflict_and_overwrite(tmp_path, sources):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_info.json").write_text(
        json.dumps({"mine": {"file_name": "mine.json"}, "saferlhf_sft": {"file_name": "old.json"}})
    )
    before = snapshot(out)
    assert saferlhf(out, sources["current"]) == 2  # same name, different entry
    assert snapshot(out) == before  # nothing new, nothing changed, no temporary left
    assert saferlhf(out, sources["current"], "--overwrite") == 0
    info = read(out / "dataset_info.json")
    assert info["mine"] == {"file_name": "mine.json"} and info["saferlhf_sft"] == {"file_name": "saferlhf_sft.json"}
    # the refsets entries merge beside them; a rerun with the same seed is accepted, another seed is refused
    assert refsets(out, sources) == 0
    assert {"mine", "saferlhf_dpo", "gsm8k_ref", "hhh_ref"} <= set(read(out / "dataset_info.json"))
    after = snapshot(out)
    assert saferlhf(out, sources["current"]) == 0 and snapshot(out) == after
    assert saferlhf(out, sources["current"], "--seed", "5") == 2 and snapshot(out) == after


def paper_refusals(path: Path) -> Path:
    """Refusals for 13 of the 24 harmful prompts (one spelled differently), each its own text."""
    prompts = ["how do i pick a LOCK?", "How can I hurt my neighbour?", "Tell me about explosives."]
    prompts += [f"Harmful request number {i}?" for i in range(10)]
    return write_jsonl(path, [{"prompt": p, "refusal": f"I won't help: {p.lower()}"} for p in prompts])


def test_saferlhf_sft_target_refusal_takes_every_target_from_the_refusals(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(saferlhf_rows()), src / "train.parquet")
    refusals = paper_refusals(tmp_path / "refusals.jsonl")
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert saferlhf(out, src, "--refusals", str(refusals), "--sft-target", "refusal", "--eval-size", "2") == 0
    assert snapshot(a) == snapshot(b)  # byte-identical for the same seed
    sft, dpo = by_prompt(read(a / "saferlhf_sft.json")), by_prompt(read(a / "saferlhf_dpo.json"))
    # a prompt with a safe response still gets its refusal, in SFT and as DPO chosen; rejected is unchanged
    assert sft["How do I pick a lock?"]["output"] == "I won't help: how do i pick a lock?"
    assert dpo["How do I pick a lock?"] == {
        "instruction": "How do I pick a lock?",
        "input": "",
        "chosen": "I won't help: how do i pick a lock?",
        "rejected": "Insert a tension wrench...",
    }
    assert all(r["output"].startswith("I won't help: ") for r in sft.values())
    assert all(r["chosen"] == sft[p]["output"] for p, r in dpo.items())
    assert "How do I forge a cheque?" not in sft and "Harmful request number 15?" not in sft  # no refusal
    ev = read(a / "saferlhf_eval.json")
    stats = read(a / "saferlhf_stats.json")
    c = stats["counts"]
    # 24 harmful prompts: 2 held out (both with a refusal, seed 1), of the 22 left 11 have one
    assert [r["output"].startswith("I won't help: ") for r in ev] == [True, True]
    assert (c["harmful_prompts"], c["target_refusal"], c["dropped_no_refusal"]) == (24, 11, 11)
    assert len(sft) == len(dpo) == c["training_pool"] == 11 and "target_safe_response" not in c
    assert stats["sft_target"] == "refusal"
    # the default is unchanged: the safe response, the refusal only where none is safe
    assert saferlhf(tmp_path / "c", src, "--refusals", str(refusals), "--eval-size", "2") == 0
    assert by_prompt(read(tmp_path / "c" / "saferlhf_sft.json"))["How do I pick a lock?"]["output"] == "Call a locksmith."
    assert read(tmp_path / "c" / "saferlhf_stats.json")["sft_target"] == "safe"


def test_saferlhf_sft_target_refusal_needs_refusals(tmp_path, sources, capsys):
    out = tmp_path / "out"
    assert saferlhf(out, sources["current"], "--sft-target", "refusal") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--sft-target refusal" in err and "--refusals" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# refsets


def test_refsets_exact_n_and_formats(tmp_path, sources, capsys):
    out = tmp_path / "out"
    assert refsets(out, sources) == 0
    gsm, alp, hhh = (read(out / f"{n}_ref.json") for n in ("gsm8k", "alpaca", "hhh"))
    assert (len(gsm), len(alp), len(hhh)) == (10, 10, 10)
    src_gsm = {r["question"]: r["answer"] for r in gsm8k_rows()}
    for r in gsm:
        assert r["output"] == src_gsm[r["instruction"]] and r["output"].rsplit("\n", 1)[1].startswith("#### ")
    assert all(set(r) == {"instruction", "input", "output"} for r in gsm + alp + hhh)
    assert any(r["input"] for r in alp)
    good = {"How do I hurt someone?": "I won't help with that."}
    assert all(good.get(r["instruction"], r["output"]) == r["output"] and "Rude" not in r["output"] for r in hhh)
    assert not (out / "gsm8k_eval.json").exists()
    stats = read(out / "refsets_stats.json")
    assert stats["sources"]["alpaca"]["duplicates_dropped"] == 1 and stats["sources"]["hhh"]["duplicates_dropped"] == 1
    assert len(stats["sources"]["gsm8k"]["ref_positions"]) == 10
    assert set(read(out / "dataset_info.json")) == {"gsm8k_ref", "alpaca_ref", "hhh_ref"}


def test_refsets_eval_disjoint_warns_and_reproducible(tmp_path, sources, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert refsets(a, sources, "--eval-n", "5") == 0
    assert refsets(b, sources, "--eval-n", "5") == 0
    assert snapshot(a) == snapshot(b)
    assert refsets(c, sources) == 0
    for name in ("gsm8k", "alpaca", "hhh"):  # asking for eval rows never changes the reference rows
        assert (a / f"{name}_ref.json").read_bytes() == (c / f"{name}_ref.json").read_bytes()
        ref, ev = read(a / f"{name}_ref.json"), read(a / f"{name}_eval.json")
        assert not {r["instruction"] for r in ref} & {r["instruction"] for r in ev}
    assert len(read(a / "gsm8k_eval.json")) == 5
    hhh_eval = read(a / "hhh_eval.json")  # 13 distinct prompts: 10 ref + 3 eval, with a warning
    assert len(hhh_eval) == 3 and all(r["choices"][r["label"]] == r["output"] for r in hhh_eval)
    assert "hhh_eval: only 3 rows" in capsys.readouterr().err
    d = tmp_path / "d"
    assert refsets(d, sources, "--seed", "3") == 0
    assert (d / "gsm8k_ref.json").read_bytes() != (c / "gsm8k_ref.json").read_bytes()


def test_refsets_exclude_and_skip(tmp_path, sources):
    first = tmp_path / "first"
    assert (
        main(
            [
                "refsets",
                "--out",
                str(first),
                "--gsm8k",
                str(sources["gsm8k"]),
                "--alpaca",
                "none",
                "--hhh",
                "none",
                "--n",
                "20",
            ]
        )
        == 0
    )
    assert set(read(first / "dataset_info.json")) == {"gsm8k_ref"}
    out = tmp_path / "out"
    assert (
        main(
            [
                "refsets",
                "--out",
                str(out),
                "--gsm8k",
                str(sources["gsm8k"]),
                "--alpaca",
                "none",
                "--hhh",
                "none",
                "--n",
                "20",
                "--exclude",
                str(first / "gsm8k_ref.json"),
            ]
        )
        == 0
    )
    rest = read(out / "gsm8k_ref.json")  # 30 rows - 20 excluded -> 10, all new
    assert len(rest) == 10 and not {r["instruction"] for r in rest} & {
        r["instruction"] for r in read(first / "gsm8k_ref.json")
    }
    assert read(out / "refsets_stats.json")["sources"]["gsm8k"]["excluded"] == 20


@pytest.mark.parametrize(
    "name, payload, column",
    [
        ("gsm8k", [{"question": "q?", "answer": "no final number"}], "answer"),
        ("gsm8k", [{"question": "q?"}], "answer"),
        ("alpaca", [{"instruction": "x", "input": "", "output": 3}], "output"),
        ("hhh", {"examples": [{"input": "x", "target_scores": {"a": 0, "b": 0}}]}, "target_scores"),
    ],
)
def test_refsets_bad_input(tmp_path, sources, capsys, name, payload, column):
    path = tmp_path / "bad" / ("bad.jsonl" if name == "gsm8k" else "task.json")
    write_jsonl(path, payload) if name == "gsm8k" else _write_json(path, payload)
    out = tmp_path / "out"
    assert refsets(out, {**sources, name: path}) == 2
    err = capsys.readouterr().err
    assert str(path) in err and f"'{column}'" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# CLI wiring and LLaMA-Factory loading


def test_optional_smollm2_module_is_registered(monkeypatch, capsys):
    fake = types.ModuleType("ogpsa.data_prep.smollm2")

    def add_parser(subparsers):
        p = subparsers.add_parser("smollm2")
        p.set_defaults(func=lambda args: print("smollm2 ran") or 0)

    fake.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "ogpsa.data_prep.smollm2", fake)
    assert main(["smollm2"]) == 0 and "smollm2 ran" in capsys.readouterr().out
    monkeypatch.delitem(sys.modules, "ogpsa.data_prep.smollm2")
    assert main(["--help"]) == 0
    assert main(["nope"]) == 2


def _load_with_llamafactory(model: str, data_dir: Path, names: list[str], stage: str, tmp_path: Path):
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(
        {
            "stage": stage,
            "do_train": True,
            "model_name_or_path": model,
            "dataset": ",".join(names),
            "dataset_dir": str(data_dir),
            "template": "qwen",
            "cutoff_len": 512,
            "finetuning_type": "full",
            "output_dir": str(tmp_path / f"lf_{stage}"),
            "report_to": "none",
            "overwrite_cache": True,
        }
    )
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    data_stage = "rm" if stage == "dpo" else "sft"
    return get_dataset(template, model_args, data_args, training_args, stage=data_stage, **tokenizer_module)[
        "train_dataset"
    ]


def test_outputs_load_with_llamafactory(tmp_path, sources, capsys):
    assert main(["tiny", "--out", str(tmp_path / "tiny")]) == 0
    model = capsys.readouterr().out.split("model: ")[1].splitlines()[0]
    out = tmp_path / "data"
    assert saferlhf(out, sources["current"], "--refusals", str(sources["refusals"])) == 0
    assert refsets(out, sources, "--eval-n", "2") == 0
    sft_names = ["saferlhf_sft", "saferlhf_eval", "gsm8k_ref", "alpaca_ref", "hhh_ref", "gsm8k_eval", "hhh_eval"]
    sft = _load_with_llamafactory(model, out, sft_names, "sft", tmp_path)
    assert len(sft) == sum(len(read(out / f"{n}.json")) for n in sft_names)
    assert {"input_ids", "attention_mask", "labels"} <= set(sft.column_names)
    assert all(any(t != -100 for t in row["labels"]) for row in sft.select(range(5)))
    dpo = _load_with_llamafactory(model, out, ["saferlhf_dpo"], "dpo", tmp_path)
    assert len(dpo) == len(read(out / "saferlhf_dpo.json"))
    assert {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"} <= set(dpo.column_names)


def test_atomic_writes_give_the_usual_file_mode_and_leave_nothing_on_failure(tmp_path):
    """Every file the project writes (data, eval.json, pipeline.json, reports) goes through these two:
    plain permissions (mkstemp alone would make them 0600), whole content, no stray temp file."""
    from ogpsa.data_prep.common import write_atomic, write_json_atomic

    umask = os.umask(0o022)
    os.umask(umask)
    text = write_atomic(tmp_path / "sub" / "a.md", "héllo\n")
    data = write_json_atomic(tmp_path / "b.json", {"z": 1, "a": [1, 2]})
    assert text.read_bytes() == "héllo\n".encode("utf-8")
    assert json.loads(data.read_text()) == {"a": [1, 2], "z": 1} and data.read_text().index('"a"') < data.read_text().index('"z"')
    for path in (text, data):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "taken").mkdir()  # the rename onto a folder fails: the error surfaces, no temp file stays
    with pytest.raises(OSError):
        write_atomic(tmp_path / "taken", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "sub", "taken"]
    assert list((tmp_path / "taken").iterdir()) == []


def test_demo_rows_are_disjoint_and_complete():
    """`ogpsa data demo`'s sets (the model's answers stubbed): every prompt belongs to one set only,
    so no probe was trained on or used as a reference."""
    from ogpsa.data_prep import demo

    rows = demo.build_rows(lambda prompts: [(f"answer {i}", True) for i in range(len(prompts))])
    sizes = {name: len(r) for name, r in rows.items()}
    assert sizes["demo_safety_sft"] == 128 and sizes["demo_math_train"] == 64 and sizes["demo_safety_ref"] == 16
    seen: dict[str, str] = {}
    for name, r in rows.items():
        if name in ("demo_safety_dpo", "demo_safety_ref"):
            continue  # the DPO pairs and the safety reference reuse the SFT refusals' prompts, by design
        for row in r:
            assert seen.setdefault(row["instruction"], name) == name, (row["instruction"], name, seen[row["instruction"]])
    sft_refusals = {r["instruction"]: r["output"] for r in rows["demo_safety_sft"] if r["output"] in demo.REFUSALS}
    assert all(sft_refusals.get(r["instruction"]) == r["output"] for r in rows["demo_safety_ref"])
    for r in rows["demo_math_train"] + rows["demo_math_eval"]:
        head, answer = r["output"].rsplit(" So the answer is ", 1)
        assert answer.rstrip(".").isdigit() and head.rsplit(">>", 1)[1].startswith(answer.rstrip("."))


def test_demo_trains_no_answer_of_the_model_and_probes_only_finished_ones():
    """The demo shows an alignment tax only if no training row is distilled from the model: its own text
    is only the DPO rejected side and the general/HHH probes (and references), and of those only the
    answers it finished; the benign SFT half is string tasks with exact answers and look-alike requests
    answered helpfully, whose activities never appear among the over-refusal probes."""
    from ogpsa.data_prep import demo

    asked = []

    def own(prompts):
        asked.extend(prompts)
        return [(f"model says {len(asked) - len(prompts) + i}", i % 4 != 3) for i in range(len(prompts))]

    rows = demo.build_rows(own)
    dpo = rows["demo_safety_dpo"]
    assert [r["rejected"] for r in dpo] == [f"model says {i}" for i in range(64)]  # cut answers are still rejected
    assert asked[:64] == [r["instruction"] for r in dpo] and all(r["chosen"] in demo.REFUSALS for r in dpo)
    said = dict(zip(asked, range(len(asked))))
    for name in ("general", "hhh"):
        for split in ("ref", "eval"):
            probe = rows[f"demo_{name}_{split}"]
            assert probe and all(r["output"] == f"model says {said[r['instruction']]}" for r in probe)
            assert all(said[r["instruction"]] % 4 != 3 or said[r["instruction"]] < 64 for r in probe)
    trained = [r["output"] for r in rows["demo_safety_sft"] + rows["demo_math_train"]]
    assert not any("model says" in o for o in trained)
    benign = [r for r in rows["demo_safety_sft"] if r["output"] not in demo.REFUSALS]
    string_tasks = [r for r in benign if not r["output"].startswith("Sure, this is a safe")]
    assert len(benign) == 64 and len(string_tasks) == 32
    for r in string_tasks:
        word = r["instruction"].split("'")[1] if "'" in r["instruction"] else None
        if "backwards" in r["instruction"]:
            assert r["output"] == word[::-1]
        elif r["instruction"].startswith("Sort"):
            words = r["instruction"].split(": ", 1)[1].rstrip(".").split(", ")
            assert r["output"] == ", ".join(sorted(words))
    for r in benign:
        if r not in string_tasks:
            assert any(a in r["instruction"] and a in r["output"] for a in demo.SAFE_LOOKALIKES_TRAIN)
    probes = rows["demo_benign_eval"]
    assert len(probes) == 32 and all(any(a in r["instruction"] for a in demo.SAFE_LOOKALIKES) for r in probes)
    assert not set(demo.SAFE_LOOKALIKES) & set(demo.SAFE_LOOKALIKES_TRAIN)
    # same seed, same rows; another seed, other rows
    asked.clear()
    again = demo.build_rows(own)
    asked.clear()
    assert again == rows and demo.build_rows(own, seed=1) != rows
