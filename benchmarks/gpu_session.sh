#!/usr/bin/env bash
# The GPU acceptance run: one script, one call of the device tool (benchmarks/README.md, "GPU acceptance
# run", has the exact call). From the repository root of a machine with one CUDA GPU, PyTorch and no network:
#
#   bash benchmarks/gpu_wheels.sh                       # before, where the package registry is reachable
#   OUT=/tmp/out bash benchmarks/gpu_session.sh          # on the GPU machine
#   GPU_REHEARSAL=cpu OUT=/tmp/out bash benchmarks/gpu_session.sh   # the same parts on CPU, small sizes
#
# Parts, in order of value; each has its own time cap, is cut at the run's deadline, and a failure or a
# timeout in one does not stop the next:
#   install      the carried wheels (.gpu_wheels/) and this project into python3's environment, offline
#   facts        device, driver, versions, the runtime's requirement check and imports
#   zero3        ogpsa_sft and ogpsa_dpo through stock llamafactory-cli under ZeRO-3 (recipes/ds_z3_config.json),
#                bf16 mixed precision with float32 master weights, one GPU, against the plain runs; the null
#                space's SFT under ZeRO-3 (each MLP linear's outputs on the reference inputs within its bound)
#   fsdp         FSDP2 end to end through accelerate (sft, dpo, the null space's sft); FSDP1 refused
#   bf16         the tiny model's first-order checks in bf16 on one process; both methods' CUDA transforms
#                (residuals, host/device copies)
#   bench_500m_update, bench_500m_gradient, bench_1500m
#                plain vs each method's step time (the gradient span and, in bench_500m_update, the null
#                space), rebuild, device-to-host reads per step, and peak memory against plain + the
#                constraint's state + one tensor of scratch; Qwen2.5-0.5B (then 1.5B) shape with random
#                weights, 4 x 1024 tokens x 4 accumulation, at the default schedule
#
# Everything lands under $OUT in at most 6 files (the device tool returns 8): summary.md (also printed at
# the end), manifest.json (device facts and every part's status, seconds and reason), checks.json (what
# each check measured), tests.xml (JUnit), bench.json (each benchmark part's bench.json) and logs.tar.gz
# (every log, JUnit file and bench.md). They are rewritten after each part, so a run cut short keeps
# what finished.
#
# Settings (environment): OUT; GPU_BUDGET_S (seconds for all parts: 470 on a GPU, 1800 in the rehearsal);
# GPU_PARTS (comma-separated subset, in the order above); GPU_CAP_<part> (one part's cap in seconds; a cap
# under 25 s skips the part); GPU_WHEELS (default .gpu_wheels); GPU_PYTHON (default python3);
# GPU_WORK (scratch, default /tmp/ogpsa_gpu_work); GPU_FAIL_PART=<part> plants a failure in that part
# (the rehearsal shows the others still run).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/ogpsa_gpu_out}
WORK=${GPU_WORK:-/tmp/ogpsa_gpu_work}
REHEARSAL=${GPU_REHEARSAL:-}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
PY=${GPU_PYTHON:-python3}
ALL_PARTS=install,facts,zero3,fsdp,bf16,bench_500m_update,bench_500m_gradient,bench_1500m
PARTS=${GPU_PARTS:-$ALL_PARTS}
MIN_START=25  # a part is not started with less time than this left
RESERVE=10    # kept back for the final collection
case "$REHEARSAL" in
  "") BUDGET=${GPU_BUDGET_S:-470} ;;
  cpu) BUDGET=${GPU_BUDGET_S:-1800}
       export CUDA_VISIBLE_DEVICES="" ;;  # the CPU path, also on a machine that has a GPU
  *) echo "gpu_session: GPU_REHEARSAL takes 'cpu' or nothing" >&2; exit 2 ;;
esac
if [ -z "$REHEARSAL" ]; then
  declare -A CAP=([install]=90 [facts]=45 [zero3]=200 [fsdp]=140 [bf16]=110
                  [bench_500m_update]=200 [bench_500m_gradient]=110 [bench_1500m]=240)
else
  declare -A CAP=([install]=180 [facts]=90 [zero3]=660 [fsdp]=150 [bf16]=300
                  [bench_500m_update]=240 [bench_500m_gradient]=240 [bench_1500m]=240)
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
PY=$(command -v "$PY") || { echo "gpu_session: no $PY" >&2; exit 2; }
export PATH="$(dirname "$PY"):$PATH"  # llamafactory-cli and torchrun of the same environment
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$WORK/junit" "$WORK/bench" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DISABLE_VERSION_CHECK=1 \
  TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true GPU_RECORD="$WORK/checks.jsonl" GPU_REHEARSAL="$REHEARSAL"
echo "{\"started\": $START, \"budget_s\": $BUDGET, \"rehearsal\": \"$REHEARSAL\", \"parts\": \"$PARTS\"}" >"$WORK/run.json"

# --- the two helpers, stdlib only (they run whatever the install did) --------------------------------------
cat >"$WORK/facts.py" <<'EOF'
"""Device and environment facts; exit 1 when the training stack does not import or its pins are not met."""
import importlib, json, os, platform, shutil, subprocess, sys
from importlib import metadata

facts = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine(),
         "cpus": os.cpu_count(), "rehearsal": os.environ.get("GPU_REHEARSAL", "")}
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True)
    facts["nvidia_smi"] = (q.stdout or q.stderr).strip()
else:
    facts["nvidia_smi"] = "skipped: no CUDA (no nvidia-smi)"
import torch
facts["torch"], facts["torch_cuda"] = torch.__version__, torch.version.cuda
facts["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                       "count": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported(),
                       "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
else:
    facts["device"] = "skipped: no CUDA"
names = ["llamafactory-ogpsa", "llamafactory", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets",
         "deepspeed", "huggingface-hub", "safetensors", "fsspec", "numpy", "pyarrow", "pandas", "pydantic", "regex",
         "torch", "triton", "pytest"]
facts["versions"] = {}
for n in names:
    try:
        facts["versions"][n] = metadata.version(n)
    except metadata.PackageNotFoundError:
        facts["versions"][n] = None
# every requirement of the training stack met by what is installed (web UI / API / multimodal extras of
# llamafactory are never imported by training and are not carried)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn
NOT_CARRIED = {cn(n) for n in ["gradio", "fastapi", "uvicorn", "sse-starlette", "av", "modelscope", "hf-transfer",
                                "torchdata", "torchaudio", "torchvision"]}
problems, seen, todo = [], set(), [("llamafactory-ogpsa", ("deepspeed",))]
while todo:
    name, extras = todo.pop()
    if cn(name) in seen:
        continue
    seen.add(cn(name))
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        problems.append(f"{name}: not installed")
        continue
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        if cn(req.name) in NOT_CARRIED:
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} (for {name}): not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have} (for {name}): needs {req.specifier}")
        todo.append((req.name, tuple(req.extras)))
facts["requirement_problems"] = sorted(set(problems))
facts["imports"] = {}
for mod in ["ogpsa.plugin.callback", "ogpsa.pipelines.integration.hook", "llamafactory.train.tuner", "trl", "deepspeed",
            "datasets", "peft", "accelerate"]:
    try:
        importlib.import_module(mod)
        facts["imports"][mod] = "ok"
    except Exception as e:  # noqa: BLE001  a fact to report, not to stop on
        facts["imports"][mod] = f"{type(e).__name__}: {e}"
try:
    from deepspeed.accelerator import get_accelerator
    facts["deepspeed_accelerator"] = get_accelerator()._name
except Exception as e:  # noqa: BLE001
    facts["deepspeed_accelerator"] = f"{type(e).__name__}: {e}"
json.dump(facts, open(sys.argv[1], "w"), indent=1)
print(json.dumps(facts, indent=1))
bad = [m for m, v in facts["imports"].items() if v != "ok"]
sys.exit(1 if bad or facts["requirement_problems"] else 0)
EOF

cat >"$WORK/collect.py" <<'EOF'
"""Gather the parts' results into $OUT: 6 files, each written atomically (no folders)."""
import glob, io, json, os, sys, tarfile, time
import xml.etree.ElementTree as ET

work, out = sys.argv[1], sys.argv[2]
final = len(sys.argv) > 3 and sys.argv[3] == "final"


def write(name, data):
    tmp = os.path.join(out, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, os.path.join(out, name))


def jsonl(path):
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


run = json.load(open(os.path.join(work, "run.json")))
parts = jsonl(os.path.join(work, "parts.jsonl"))
facts = json.load(open(os.path.join(work, "facts.json"))) if os.path.exists(os.path.join(work, "facts.json")) else None
suites = ET.Element("testsuites")
for part in parts:
    path = os.path.join(work, "junit", f"{part['name']}.xml")
    if not os.path.exists(path):
        continue
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        continue
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ([root] if root.tag == "testsuite" else list(root)):
        suite.set("name", part["name"])
        suites.append(suite)
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    part["tests"] = counts
    skipped = [c.find("skipped").get("message", "") for c in root.iter("testcase") if c.find("skipped") is not None]
    if counts["tests"] and counts["skipped"] == counts["tests"] and part["status"] == "ok":
        part["status"] = "skipped"
        part["reason"] = "; ".join(sorted(set(skipped)))
    elif skipped:
        part["note"] = "skipped inside: " + "; ".join(sorted(set(skipped)))
benches = {}
for part in parts:
    path = os.path.join(work, "bench", part["name"], "bench.json")
    if os.path.exists(path):
        b = json.load(open(path))
        benches[part["name"]] = b
        part["bench_complete"] = b.get("complete")
        part["targets_met"] = b.get("targets_met")
checks = jsonl(os.path.join(work, "checks.jsonl"))
manifest = {"run": run, "finished": time.time() if final else None, "elapsed_s": time.time() - run["started"],
            "complete": final, "facts": facts, "parts": parts}

lines = [f"# GPU acceptance run{' (CPU rehearsal)' if run['rehearsal'] else ''}", ""]
if facts:
    dev = facts.get("device")
    lines.append(f"Device: {dev['name'] if isinstance(dev, dict) else dev}; nvidia-smi: {facts.get('nvidia_smi')}; "
                 f"torch {facts.get('torch')} (CUDA {facts.get('torch_cuda')}); python {facts.get('python')}.")
    v = facts.get("versions", {})
    lines.append("Versions: " + ", ".join(f"{k} {v[k]}" for k in ("llamafactory", "transformers", "deepspeed",
                                                                     "accelerate", "peft", "trl") if k in v) + ".")
    if facts.get("requirement_problems"):
        lines.append("Requirement problems: " + "; ".join(facts["requirement_problems"]) + ".")
lines += [f"Elapsed {manifest['elapsed_s']:.0f} s of a {run['budget_s']} s budget"
          f"{'' if final else ' (still running or cut short)'}.", "",
          "| part | status | seconds | tests (pass/fail/skip) | note |", "|---|---|---|---|---|"]
for p in parts:
    t = p.get("tests")
    tests = (f"{t['tests'] - t['failures'] - t['errors'] - t['skipped']}/{t['failures'] + t['errors']}/{t['skipped']}"
             if t else "-")
    note = "; ".join(x for x in (p.get("reason", ""), p.get("note", "")) if x)
    lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {tests} | {note or '-'} |")
if checks:
    lines += ["", "| check | engine | precision | largest reference-loss change, plain / OGPSA | target loss change (OGPSA) |"
              " basis bytes / parameters |", "|---|---|---|---|---|---|"]
    for c in checks:
        if "moved_plain" not in c:
            continue
        ratio = c["moved_plain"] / c["moved_ogpsa"] if c.get("moved_ogpsa") else float("inf")
        per = (c["basis_bytes_total"] / c["param_numel"]) if c.get("param_numel") else None
        lines.append(f"| {c['check']} | {c.get('engine')} | {c['precision']} | {c['moved_plain']:.4f} / "
                     f"{c['moved_ogpsa']:.5f} ({ratio:.0f}x) | {c['target_change_ogpsa']:+.4f} | "
                     f"{'-' if per is None else f'{per:.0f}'} |")
null = [c for c in checks if c.get("layers")]
if null:
    lines += ["", "| null-space check | engine | precision | MLP outputs on the reference inputs: largest moved / bound | "
              "smallest plain / null-space move | null dims |", "|---|---|---|---|---|---|"]
    for c in null:
        worst = max(c["layers"], key=lambda w: w["moved"] / max(w["bound"], 1e-30))
        gap = min(w["plain_moved"] / max(w["moved"], 1e-30) for w in c["layers"])
        lines.append(f"| {c['check']} | {c.get('engine')} | {c['precision']} | {worst['moved']:.4g} / {worst['bound']:.4g} "
                     f"({worst['layer']}) | {gap:.1f}x | {c.get('null_dims')} |")
for name, b in benches.items():
    md = os.path.join(work, "bench", name, "bench.md")
    if os.path.exists(md):
        lines += ["", f"## {name}", "", open(md).read().strip()]
summary = "\n".join(lines) + "\n"

write("manifest.json", json.dumps(manifest, indent=1, default=str) + "\n")
write("summary.md", summary)
write("checks.json", json.dumps(checks, indent=1) + "\n")
write("tests.xml", ET.tostring(suites, encoding="unicode"))
write("bench.json", json.dumps(benches, indent=1) + "\n")
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for path in sorted(glob.glob(os.path.join(work, "logs", "*")) + glob.glob(os.path.join(work, "junit", "*"))
                       + glob.glob(os.path.join(work, "bench", "*", "bench.md"))
                       + glob.glob(os.path.join(work, "*.json*"))):
        tar.add(path, arcname=os.path.relpath(path, work))
write("logs.tar.gz", buf.getvalue())
if final:
    print(summary)
EOF

collect() { "$PY" "$WORK/collect.py" "$WORK" "$OUT" "${1:-}" || python3 "$WORK/collect.py" "$WORK" "$OUT" "${1:-}"; }

# part NAME COMMAND: run COMMAND (a bash string) under the part's cap and the run's deadline, log to
# $WORK/logs/NAME.log, record status, seconds and reason in $WORK/parts.jsonl, then rewrite $OUT.
part() {
  local name=$1 cmd=$2 var cap left limit t0 rc status reason=""
  case ",$PARTS," in *",$name,"*) ;; *) return 0 ;; esac
  var="GPU_CAP_${name//[^A-Za-z0-9]/_}"
  cap=${!var:-${CAP[$name]}}
  left=$((DEADLINE - RESERVE - $(date +%s)))
  limit=$((cap < left ? cap : left))
  t0=$(date +%s)
  if [ "$limit" -lt "$MIN_START" ]; then
    status=skipped reason="budget: ${limit}s available (cap ${cap}s, ${left}s left), under ${MIN_START}s"
    rc=0
  else
    if [ "${GPU_FAIL_PART:-}" = "$name" ]; then
      cmd="echo 'planted failure (GPU_FAIL_PART=$name)'; exit 3"
    fi
    echo "gpu_session: $name (up to ${limit}s)"
    timeout -k 10 "$limit" bash -c "$cmd" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status=timeout reason="stopped at ${limit}s" ;;
      *) status=failed reason="exit $rc: $(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -1 | cut -c1-200)" ;;
    esac
  fi
  "$PY" -c 'import json, sys; n, s, r, rc, t, lim = sys.argv[1:]; print(json.dumps({"name": n, "status": s,
    "reason": r, "rc": int(rc), "seconds": float(t), "limit_s": int(lim)}))' \
    "$name" "$status" "$reason" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$WORK/parts.jsonl" 2>/dev/null ||
    echo "{\"name\": \"$name\", \"status\": \"$status\", \"reason\": \"see logs/$name.log\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"limit_s\": $limit}" >>"$WORK/parts.jsonl"
  echo "gpu_session: $name $status ($(($(date +%s) - t0)) s) $reason"
  collect
}

pytest_part() {  # pytest_part NAME -k EXPRESSION
  part "$1" "'$PY' -m pytest tests/test_gpu.py -m gpu -k '$2' -p no:cacheprovider -q -rA -o junit_logging=all \
    --junitxml='$WORK/junit/$1.xml'"
}

bench_part() {  # bench_part NAME SIZE TARGET METHODS
  local args
  if [ -z "$REHEARSAL" ]; then
    args="--device cuda --sizes $2 --batch 4 --seq-len 1024 --grad-accum 4 --warmup 2 --steps 5 --ref-samples 100"
  else  # same code path, sizes a shared 2-core machine runs in a minute
    args="--device cpu --sizes 10m --batch 2 --seq-len 32 --grad-accum 2 --warmup 1 --steps 1 --ref-samples 2"
  fi
  part "$1" "'$PY' benchmarks/run.py $args --target $3 --methods $4 --stages sft,dpo --repeats 1 \
    --rebuild-repeats 1 --out '$WORK/bench/$1' --assets '$WORK/bench/_assets'"
}

part install "set -e; ls '$WHEELS'/*.whl >/dev/null || { echo 'no wheels in $WHEELS: run benchmarks/gpu_wheels.sh first and carry $WHEELS'; exit 1; }
  '$PY' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check '$WHEELS'/*.whl
  '$PY' -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --disable-pip-version-check .
  '$PY' -m pip list 2>/dev/null"
part facts "'$PY' '$WORK/facts.py' '$WORK/facts.json'"
pytest_part zero3 "zero3"
pytest_part fsdp "fsdp"
pytest_part bf16 "not zero3 and not fsdp"
# the null space in the first only: its step time and one build (a forward over the reference sets) at 0.5B
bench_part bench_500m_update 500m update gradient_span,null_space
bench_part bench_500m_gradient 500m gradient gradient_span
bench_part bench_1500m 1.5b update gradient_span
collect final
failed=$(grep -c '"status": "\(failed\|timeout\)"' "$WORK/parts.jsonl" 2>/dev/null)
[ "${failed:-0}" -eq 0 ]
