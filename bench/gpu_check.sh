#!/usr/bin/env bash
# GPU check (issue 15): install the project as declared, then run `python -m bench.gpu_check`.
#
#   bash bench/gpu_check.sh [--json gpu.json] [--batches 1 8 64 256] [--workers 4] [--images 2000] ...
#   bash bench/gpu_check.sh --allow-cpu --batches 1 8 --seconds 1 --workers 1 --images 16   # dry run, no GPU
#   GPU_CHECK_WHEELHOUSE=/path/to/wheels bash bench/gpu_check.sh ...                        # offline host
#
# Installs only what pyproject.toml declares (`pip install -e .`; onnxruntime-gpu is the declared
# runtime) into $GPU_CHECK_VENV (default .venv-gpu, or the existing .venv when it has the project).
# Offline, or with pip unable to install, it uses an environment that already has the project.
# GPU_CHECK_CUDA_WHEELS=1 also installs onnxruntime-gpu[cuda,cudnn] (NVIDIA's CUDA 13 / cuDNN 9
# runtime wheels): NOT declared by the project; only for a machine without those libraries.
# Exit status: 0 done, 2 no usable CUDA provider (and no --allow-cpu), 3 a step failed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# An air-gapped GPU host (no package index): GPU_CHECK_WHEELHOUSE=DIR holds onnxruntime-gpu and the
# project's dependencies that the host's Python lacks, as wheels (see docs/operations.md, "GPU").
# They are installed without resolution into a private folder put first on PYTHONPATH, and the
# check runs from this checkout with the host's python3 (its numpy, OpenCV, CUDA libraries).
if [ -n "${GPU_CHECK_WHEELHOUSE:-}" ]; then
  SITE=${GPU_CHECK_SITE:-$(mktemp -d)/site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$GPU_CHECK_WHEELHOUSE"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "gpu_check: nvidia-smi not found" >&2
  exec "$PY" -m bench.gpu_check "$@"
fi
VENV=${GPU_CHECK_VENV:-}
if [ -z "$VENV" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import dermgate, onnxruntime" 2>/dev/null; then
    VENV=.venv
  else
    VENV=.venv-gpu
  fi
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/pip" install -q -e . ; then
  echo "gpu_check: pip install -e . failed (offline?); using what $VENV already has" >&2
fi
if [ "${GPU_CHECK_CUDA_WHEELS:-0}" = "1" ]; then
  echo "gpu_check: installing onnxruntime-gpu[cuda,cudnn] (not declared by the project)" >&2
  "$VENV/bin/pip" install -q "onnxruntime-gpu[cuda,cudnn]"
fi
if ! "$VENV/bin/python" -c "import dermgate, inference, onnxruntime" ; then
  echo "gpu_check: the project is not importable from $VENV" >&2
  exit 3
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "gpu_check: nvidia-smi not found" >&2
exec "$VENV/bin/python" -m bench.gpu_check "$@"
