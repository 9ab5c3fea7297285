#!/usr/bin/env bash
# The main job: a real fine-tuning run with the defaults (see README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m experiments.finetune "$@"
