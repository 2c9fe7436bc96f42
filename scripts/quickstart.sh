#!/usr/bin/env bash
# Install into ./.venv and train the quickstart LoRA (SmolLM2-135M-Instruct, built-in demo chats; a few minutes on
# 2 CPU cores). It ends by printing where things went (run dir, adapter dir, checkpoint), the TensorBoard command
# and the next commands to try. Extra arguments go to `fit`, e.g. `bash scripts/quickstart.sh --trainer.max_steps 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/python -m em_lightning fit --config configs/quickstart.yaml "$@"
