#!/usr/bin/env bash
# Puts into .gpu_wheels/ (git-ignored) exactly the Python packages the GPU machine lacks, as wheels for
# x86_64 / CPython 3.12, for benchmarks/gpu_session.sh to install there with no network.
#
#   bash benchmarks/gpu_wheels.sh          # from any directory, with network to the package registry
#
# The list compares the runtime closure of `llamafactory-ogpsa[deepspeed]` at the constraints.txt pins
# (this project's .venv) with the packages of the GPU image (the device notes' KINDS.md, read 2026-11):
# - absent there: llamafactory, trl, datasets (+ dill, multiprocess), deepspeed (+ hjson, pydantic,
#   pydantic-core, annotated-types, typing-inspection), omegaconf, fire (+ termcolor), tyro (+
#   docstring-parser, shtab), and hatchling (+ trove-classifiers) to install this project from the
#   working tree there;
# - there at a version our pins exclude: transformers (5.17.0 there, pinned 5.5.4), tokenizers (0.23.2;
#   transformers 5.5.4 takes <= 0.23.0), accelerate (1.15.0; llamafactory 0.9.5 takes <= 1.11.0);
# - there at a version not recorded, with a narrow requirement here: peft (llamafactory: 0.18.0-0.18.1),
#   fsspec (datasets 4.0.0: <= 2025.3.0), regex (transformers 5.5.4 refuses to import below 2025.10.22).
# Everything else the closure needs (torch 2.11.0, numpy, pyarrow, pandas, huggingface-hub, safetensors,
# einops, msgpack, ninja, psutil, ...) is in the image. llamafactory's web UI, API and multimodal
# extras (gradio, fastapi, uvicorn, av, ...) are never imported by training and are not carried.
#
# DeepSpeed alone is published as a source archive only: it is built into a pure-Python wheel here (no
# compiled ops, none of which ZeRO-3 with the trainer's AdamW needs; it picks the CUDA accelerator at run time). Prints the total size
# against the 64 MiB that the working tree and the carried folders may take together.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS:-.gpu_wheels}
PYVER=${GPU_WHEELS_PY:-3.12}  # the GPU image's Python; another version only for a local rehearsal
PACKAGES=(
  llamafactory==0.9.5 transformers==5.5.4 tokenizers==0.22.2 accelerate==1.11.0 peft==0.18.1 trl==0.24.0
  datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 regex==2026.11.19
  hjson==3.1.0 pydantic==2.12.3 pydantic-core==2.41.4 annotated-types==0.8.0 typing-inspection==0.4.5
  omegaconf==2.4.0 fire==0.7.1 termcolor==3.3.0 tyro==0.8.14 docstring-parser==0.18.0 shtab==1.13.0
  hatchling==1.33.0 trove-classifiers==2026.9.21.13
)
BUILT=(deepspeed==0.19.8)

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$DEST" "${PACKAGES[@]}"
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$DEST" "${BUILT[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
want=$(( ${#PACKAGES[@]} + ${#BUILT[@]} ))
if [ "$count" -ne "$want" ]; then
  echo "gpu_wheels: $count wheels in $DEST, expected $want" >&2
  exit 1
fi
wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
python3 -c "import sys; w, t = (int(x) / 2**20 for x in sys.argv[1:]); print(f'gpu_wheels: $count wheels, {w:.1f} MiB; working tree {t:.1f} MiB; together {w + t:.1f} of 64 MiB')" "$wheels" "$tree"
if [ $((wheels + tree)) -gt "$limit" ]; then
  echo "gpu_wheels: over the 64 MiB the device tool carries" >&2
  exit 1
fi
