"""From the raw record of the runs (`bench.json`) to the summary: one row per size, stage and method,
its ratios against the plain stage of the same repeat, the verdicts, the table (`bench.md`)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ogpsa.plugin.files import write_atomic

TARGET_PROJ_PCT = 3.0
TARGET_REBUILD_RATIO = 1.2
TARGET_FLAT_PP = 1.0  # "flat": no size's projection % exceeds the smallest size's by more than this
# Memory bound: OGPSA's peak <= the plain run's peak + the constraint's state + one float32 tensor the
# size of the largest trainable parameter (the scratch of one tensor's projection or upcast, never a
# whole gradient)
SCRATCH_BYTES_PER_ELEMENT = 4


def targets() -> dict:
    return {"projection_pct_max": TARGET_PROJ_PCT, "rebuild_ratio_max": TARGET_REBUILD_RATIO, "flat_pp": TARGET_FLAT_PP,
            "memory_bound": "peak ogpsa <= peak plain + the constraint's state (state_dict tensors) + largest "
                            f"trainable tensor x {SCRATCH_BYTES_PER_ELEMENT} bytes"}


def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def summarise(raw: dict) -> list[dict]:
    """One row per size, stage and method that has results, in the order of the settings."""
    s = raw["settings"]
    rows = []
    for size in [z for z in s["sizes"] if z in raw["runs"]]:
        for pair in s["stages"]:
            reps = raw["runs"][size].get(pair, [])
            for method in s["methods"]:
                mine = [r for r in reps if method in r]
                if not mine:
                    continue  # not run yet (partial results)
                rows.append(_row(raw, size, pair, method, mine, s["steps"]))
    # flat: per stage and method, across sizes (in the order given, the smallest first is not assumed)
    for pair in s["stages"]:
        for method in s["methods"]:
            mine = [r for r in rows if (r["stage"], r["method"]) == (pair, method) and r.get("projection_pct") is not None]
            if len(mine) < 2:
                verdict = None
            else:
                smallest = min(mine, key=lambda r: r["params"] or 0)
                verdict = all(r["projection_pct"] <= smallest["projection_pct"] + TARGET_FLAT_PP for r in mine)
            for r in mine:
                r["pass_flat"] = verdict
    return rows


def _row(raw: dict, size: str, pair: str, method: str, reps: list[dict], steps: int) -> dict:
    ok = [r for r in reps if "error" not in r["plain"] and "error" not in r[method]]
    row = {"size": size, "params": raw["params"].get(size), "stage": pair, "method": method, "repeats": len(ok),
           "errors": [r[k]["error"] for r in reps for k in ("plain", method) if "error" in r[k]]}
    if not ok:
        return row
    first = ok[0][method]
    K = first.get("refresh_steps") or 0  # 0: built once, at the start (the method's default)
    row["K"] = K
    plain = [r["plain"]["step_ms_median"] for r in ok]
    og = [r[method]["step_ms_median"] for r in ok]
    proj = [r[method]["projection_ms_median"] for r in ok]
    reb = [r[method]["rebuild_s_median"] for r in ok]
    rawp = [r[method]["raw_fwd_bwd_s_median"] for r in ok]

    def amortised(o, b):
        return o + (1e3 * b / K if K else 0.0)

    row.update({
        "plain_ms": median(plain),
        "ogpsa_ms": median(og),
        "overhead_pct": median([100 * (o - p) / p for o, p in zip(og, plain)]),
        "projection_ms": median(proj),
        "projection_pct": median([100 * x / p for x, p in zip(proj, plain) if x is not None]),
        "rebuild_s": median(reb),
        "raw_fwd_bwd_s": median(rawp),
        "raw_pass": first.get("raw_pass"),
        "rebuild_ratio": median([a / b for a, b in zip(reb, rawp) if a and b]),
        "amortised_ms": median([amortised(o, b) for o, b in zip(og, reb) if b is not None]),
        "amortised_overhead_pct": median([100 * (amortised(o, b) - p) / p for o, b, p in zip(og, reb, plain)
                                          if b is not None]),
        "measured_incl_rebuild_ms": median([r[method]["step_incl_rebuild_ms_mean"] for r in ok]),
        "amortised_note": _amortised_note(method, K, steps),
        "peak_plain_mb": median([r["plain"]["peak_bytes"] / 2**20 for r in ok]),
        "peak_ogpsa_mb": median([r[method]["peak_bytes"] / 2**20 for r in ok]),
        "basis_mb": first["basis_bytes"] / 2**20 if first.get("basis_bytes") else None,
        "basis_bytes": first.get("basis_bytes"),
        "state_mb": first["state_bytes"] / 2**20 if first.get("state_bytes") is not None else None,
        "trainable_numel": first.get("trainable_numel"),
        "no_copy": all((r[method]["profile"] or {}).get("ok", False) for r in ok),
        "dtoh_per_step": _dtoh(first),
    })
    row.update(_per_token(ok, method, reb))
    row.update(_memory_bound(row, first))
    row["pass_projection"] = row["projection_pct"] is not None and row["projection_pct"] <= TARGET_PROJ_PCT
    row["pass_rebuild"] = row["rebuild_ratio"] is not None and row["rebuild_ratio"] <= TARGET_REBUILD_RATIO
    return row


def _dtoh(result: dict) -> dict | None:
    """Device-to-host reads (CUDA `Memcpy DtoH` events) of the profiled step: its gradient projection and,
    with the `update` target, its step projection; None where the profiler saw no CUDA (CPU)."""
    grad, step = result.get("profile") or {}, result.get("profile_step") or {}
    if "memcpy_dtoh" not in grad or not str(grad.get("grad_device", "")).startswith("cuda"):
        return None
    return {"project_grad": grad["memcpy_dtoh"], "project_step": step.get("memcpy_dtoh"),
            "total": grad["memcpy_dtoh"] + (step.get("memcpy_dtoh") or 0)}


def _amortised_note(method: str, K: int, steps: int) -> str:
    if not K:
        return f"{method} builds once (ogpsa_refresh_steps 0, its default): amortised = step"
    if steps < K:
        return f"run has {steps} timed steps < K={K}: amortised = rebuild/K + step"
    return f"run covers K={K} steps; measured_incl_rebuild_ms includes the rebuilds that fell in the timed steps"


def _memory_bound(row: dict, result: dict) -> dict:
    """OGPSA's peak against plain + the constraint's state + one float32 tensor of the largest trainable parameter."""
    largest, state = result.get("largest_tensor_numel"), result.get("state_bytes")
    if not largest or state is None or row.get("peak_plain_mb") is None:
        return {"peak_bound_mb": None, "scratch_mb": None, "pass_memory": None}
    scratch = largest * SCRATCH_BYTES_PER_ELEMENT / 2**20
    bound = row["peak_plain_mb"] + state / 2**20 + scratch
    return {"peak_bound_mb": bound, "scratch_mb": scratch, "pass_memory": row["peak_ogpsa_mb"] <= bound}


def _per_token(ok: list[dict], method: str, rebuild_s: list) -> dict:
    """What users pay per real token: a rebuild against a plain training step, and each one's padding."""
    first = ok[0][method]
    ref_real, ref_padded = first.get("ref_input_tokens"), first.get("ref_padded_tokens")
    train_real = median([x for r in ok if (x := r["plain"].get("train_real_tokens_per_step"))])
    train_padded = median([x for r in ok if (x := r["plain"].get("train_padded_tokens_per_step"))])
    plain_s = median([r["plain"]["step_ms_median"] / 1e3 for r in ok])
    out = {"ref_pad_ratio": ref_padded / ref_real if ref_real else None,
           "train_pad_ratio": train_padded / train_real if train_real else None,
           "plain_ms_per_ktok": 1e6 * plain_s / train_real if train_real else None}
    reb = median([b for b in rebuild_s if b])
    out["rebuild_ms_per_ktok"] = 1e6 * reb / ref_real if ref_real and reb else None
    if out["plain_ms_per_ktok"] and out["rebuild_ms_per_ktok"]:
        out["per_token_ratio"] = out["rebuild_ms_per_ktok"] / out["plain_ms_per_ktok"]
    else:
        out["per_token_ratio"] = None
    return out


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def _verdict(v):
    return "n/a" if v is None else ("PASS" if v else "MISS")


HEADER = ("| size | params | stage | method | plain ms/step | ogpsa ms/step (no rebuild) | overhead % | projection-only % "
          "| rebuild s | raw pass s | rebuild/raw | amortised overhead % @K | peak mem plain/ogpsa MB | basis MB "
          "| proj <=3% | rebuild <=1.2x | no H/D copy | flat "
          "| rebuild ms/1k real tok | plain step ms/1k real tok | per-token rebuild/plain | padded/real ref, train |")
COLUMNS = HEADER.count("|") - 1


def table(rows: list[dict]) -> str:
    lines = [HEADER, "|" + "|".join(["---"] * COLUMNS) + "|"]
    for r in rows:
        head = f"| {r['size']} | {_f(r['params'] and r['params'] / 1e6, '{:.1f}M')} | {r['stage']} | {r['method']} | "
        if r.get("plain_ms") is None:
            lines.append(head + " | ".join(["error"] + ["-"] * (COLUMNS - 5)) + " |")
            continue
        lines.append(
            head + f"{_f(r['plain_ms'])} | {_f(r['ogpsa_ms'])} "
            f"| {_f(r['overhead_pct'], '{:+.1f}')} | {_f(r['projection_pct'], '{:.2f}')} | {_f(r['rebuild_s'], '{:.2f}')} "
            f"| {_f(r['raw_fwd_bwd_s'], '{:.2f}')} | {_f(r['rebuild_ratio'], '{:.2f}')} "
            f"| {_f(r['amortised_overhead_pct'], '{:+.1f}')} (K={r['K'] or 'once'}) "
            f"| {_f(r['peak_plain_mb'], '{:.0f}')} / {_f(r['peak_ogpsa_mb'], '{:.0f}')} | {_f(r['basis_mb'])} "
            f"| {_verdict(r['pass_projection'])} | {_verdict(r['pass_rebuild'])} | {_verdict(r['no_copy'])} "
            f"| {_verdict(r.get('pass_flat'))} "
            f"| {_f(r.get('rebuild_ms_per_ktok'), '{:.0f}')} | {_f(r.get('plain_ms_per_ktok'), '{:.0f}')} "
            f"| {_f(r.get('per_token_ratio'), '{:.2f}')} "
            f"| {_f(r.get('ref_pad_ratio'), '{:.2f}')}, {_f(r.get('train_pad_ratio'), '{:.2f}')} |"
        )
    return "\n".join(lines)


def markdown(raw: dict, rows: list[dict]) -> str:
    s = raw["settings"]
    env = raw["environment"]
    notes = [
        (f"# OGPSA overhead benchmark ({env['device']} on {s['device']}, torch {env['torch']}, "
         f"llamafactory {env['llamafactory']}, transformers {env['transformers']})"),
        "",
        (f"Settings: batch {s['batch']} x {s.get('grad_accum', 1)} accumulation step(s), methods "
         f"{', '.join(s['methods'])}, ogpsa_target {s.get('target', 'gradient')}, cutoff_len {s['seq_len']}, "
         f"{s['steps']} timed steps after {s['warmup']} warm-up, {s['repeats']} repeat(s) (medians), "
         f"{s['ref_samples']} samples per reference set x {len(s['reference_sets'])} sets, "
         f"full fine-tuning, AdamW, {'bf16' if s['device'] == 'cuda' else 'fp32'}, {env['threads']} thread(s)."),
        f"Memory: {raw['memory_method']}.",
        "",
        table(rows),
        "",
    ]
    seen = set()
    for r in rows:  # one note per kind of amortisation
        note = r.get("amortised_note")
        if note and ("<" in note or "once" in note) and note not in seen:
            seen.add(note)
            notes.append(f"- amortised: {note}.")
    notes.append(f"- no H/D copy: {raw.get('copy_check_method') or '-'}.")
    reads = [f"{r['size']} {r['stage']} {r['method']}: {d['total']} ({d['project_grad']} in the gradient projection, "
             f"{d['project_step'] if d['project_step'] is not None else 'no'} in the step projection)"
             for r in rows if (d := r.get("dtoh_per_step"))]
    if reads:
        notes.append("- device-to-host reads in one profiled step (CUDA Memcpy DtoH): " + "; ".join(reads)
                     + ". Each projection reads its few statistics (removed norms, cosines) back once, for the log.")
    passes = sorted({(r["method"], r["raw_pass"]) for r in rows if r.get("raw_pass")})
    if passes:
        notes.append("- raw pass: the bare passes a build needs over the same reference batches: "
                     + ", ".join(f"{kind} ({method})" for method, kind in passes) + ".")
    bounds = [r for r in rows if r.get("peak_bound_mb") is not None]
    if bounds:
        notes.append("- memory bound (peak OGPSA <= peak plain + the constraint's state + one float32 tensor of the "
                     "largest trainable parameter): " + "; ".join(
                         f"{r['size']} {r['stage']} {r['method']} {r['peak_ogpsa_mb']:.0f} <= {r['peak_plain_mb']:.0f} + "
                         f"{r['state_mb']:.0f} + {r['scratch_mb']:.0f} = {r['peak_bound_mb']:.0f} MB "
                         f"{_verdict(r['pass_memory'])}" for r in bounds) + ".")
    notes.append(f"- reference answer lengths: {s.get('ref_lengths', 'equal')} (spread: as real GSM8K/Alpaca/HHH, "
                 "scaled to cutoff_len); per-token columns divide by real (non-padding) tokens.")
    for pair in s["stages"]:
        for method in s["methods"]:
            mine = [r for r in rows if (r["stage"], r["method"]) == (pair, method) and r.get("projection_pct") is not None]
            if mine:
                notes.append(f"- flat ({pair}, {method}): projection % by size: "
                             + ", ".join(f"{r['size']} {r['projection_pct']:.2f}%" for r in mine)
                             + "; end-to-end overhead %: " + ", ".join(f"{r['size']} {r['overhead_pct']:+.1f}%" for r in mine)
                             + f" (PASS when no size exceeds the smallest by more than {TARGET_FLAT_PP} pp).")
    errs = [e for r in rows for e in r.get("errors", [])]
    if errs:
        notes.append(f"- errors: {len(errs)} run(s) failed; see bench.json.")
    return "\n".join(notes) + "\n"


def write(raw: dict, out: Path, partial: bool) -> tuple[str, list[dict]]:
    """Summarise what has been measured so far into `raw` and write bench.json / bench.md atomically."""
    rows = summarise(raw)
    raw["summary"] = rows
    profiles = [res.get("profile") for size in raw["runs"].values() for reps in size.values() for rep in reps
                for key, res in rep.items() if key != "plain" and isinstance(res, dict) and res.get("profile")]
    raw["copy_check_method"] = profiles[0]["method"] if profiles else None
    raw["targets_met"] = {
        "projection_pct": all(r.get("pass_projection") for r in rows) if rows else None,
        "rebuild_ratio": all(r.get("pass_rebuild") for r in rows) if rows else None,
        "no_copy": all(r.get("no_copy") for r in rows) if rows else None,
        "memory_bound": all(r.get("pass_memory") for r in rows) if rows else None,
        "flat": (None if all(r.get("pass_flat") is None for r in rows)
                 else all(r.get("pass_flat") is not False for r in rows)),
    }
    raw["complete"] = not partial
    md = markdown(raw, rows)
    if partial:
        md = "**Partial results (the benchmark is still running or was interrupted).**\n\n" + md
    write_atomic(out / "bench.json", json.dumps(raw, indent=1, default=str) + "\n")
    write_atomic(out / "bench.md", md)
    return md, rows
