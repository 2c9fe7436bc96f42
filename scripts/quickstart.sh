#!/usr/bin/env bash
# Install into ./.venv and train the quickstart LoRA (SmolLM2-135M-Instruct, built-in demo chats; a few minutes on
# 2 CPU cores). Then: .venv/bin/tensorboard --logdir runs
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/python -m em_lightning fit --config configs/quickstart.yaml "$@"
