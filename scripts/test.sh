#!/usr/bin/env bash
# Install everything (dev extras, the vLLM CPU sidecar venv) and run the test suite, slow and vLLM tests included.
#   bash scripts/test.sh [pytest args, e.g. -m "not slow"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev --vllm
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
export EM_VLLM_PYTHON="$PWD/.venv-vllm/bin/python"
.venv/bin/python -m pytest -q --durations=25 "$@"
