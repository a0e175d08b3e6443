#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): nbkit's training step and txt2img against diffusers-example-style
# loops on real-width random models, one table in about 5 minutes on an H200 (any CUDA GPU >= 40 GB).
#
#   bench/gpu.sh                       # all parts; extra arguments go to bench/gpu_check.py
#   bench/gpu.sh --parts sd1 sdxl      # some of them
#   OUT=results bench/gpu.sh           # also writes results/gpu_check.json
#
# Python: $PYTHON, else the checkout's .venv, else python3; it must bring torch with CUDA. The checkout
# goes first on PYTHONPATH (its nbkit is what is measured); only when `import nbkit` (with diffusers,
# transformers, peft, accelerate) fails are the dependencies installed as the README does, from the
# committed lock (offline, PIP_FIND_LINKS / PIP_NO_INDEX may point pip at local wheels).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# One interpreter start for the checks (each costs seconds of the 6 minutes): 3 when an import fails.
CHECK='
import sys
try:
    import nbkit, diffusers, transformers, peft, accelerate, safetensors, torch
except ImportError as error:
    print(f"gpu.sh: {error}", file=sys.stderr)
    sys.exit(3)
sys.exit(0 if torch.cuda.is_available() else 4)'

# This checkout's nbkit, even where another one is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "$CHECK"; status=$?
if [ "$status" = 3 ]; then
  echo "gpu.sh: installing nbkit as the README does, from wheels/dev-lock.txt"
  # torch is not in the lock: the machine's CUDA build stays.
  [ -f wheels/dev-lock.txt ] && "$PYTHON" -m pip install -q --no-deps --require-hashes -r wheels/dev-lock.txt \
    || echo "gpu.sh: warning: installing from the lock failed (offline?)" >&2
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "gpu.sh: warning: installing nbkit failed; running it from the checkout" >&2
  "$PYTHON" -c "$CHECK"; status=$?
fi
if [ "$status" = 3 ] || { [ "$status" != 0 ] && [ "$status" != 4 ]; }; then
  echo "gpu.sh: nbkit or its dependencies do not import with $PYTHON" >&2
  exit 2
fi
if [ "$status" = 4 ]; then
  case " $* " in
    *" --device cpu "*) ;;
    *) echo "gpu.sh: torch sees no CUDA GPU here (the CPU smoke test: --device cpu --tiny)" >&2; exit 2 ;;
  esac
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" bench/gpu_check.py "$@"
