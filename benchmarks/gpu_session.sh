#!/usr/bin/env bash
# GPU checks and the GPU benchmark on a CUDA machine that has PyTorch but no network.
#
# On a machine with network, first put the project and the packages PyTorch images usually lack
# into .gpu_wheels/ (same versions as the CPU environment):
#   pip wheel --no-deps -w .gpu_wheels .
#   pip download --no-deps -d .gpu_wheels llamafactory==0.9.5 trl==0.24.0 datasets==4.0.0 omegaconf==2.4.0 \
#       antlr4-python3-runtime==4.9.3 dill==0.3.8 multiprocess==0.70.16 fire==0.7.1 termcolor tyro==0.8.14 \
#       docstring-parser shtab transformers==5.6.0 accelerate==1.11.0 peft==0.18.1 tokenizers==0.22.2 \
#       torchdata==0.11.0 fsspec==2025.3.0
# then on the GPU machine, from the repository root:
#   OUT=/tmp/out bash benchmarks/gpu_session.sh [benchmark arguments...]
set -euo pipefail
OUT=${OUT:-/tmp/ogpsa_gpu}
mkdir -p "$OUT"
python3 -m venv --system-site-packages /tmp/ogpsa-venv
. /tmp/ogpsa-venv/bin/activate
pip install -q --no-deps --no-index --no-build-isolation .gpu_wheels/*.whl .gpu_wheels/*.tar.gz
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch, transformers, llamafactory; print(torch.__version__, transformers.__version__, llamafactory.__version__)" | tee -a "$OUT/device.txt"
python -m pytest tests/test_gpu.py tests/test_projection.py -q -p no:cacheprovider -o addopts="" -s 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
python benchmarks/run.py --device cuda --out "$OUT/bench" "$@" 2>&1 | tail -40
