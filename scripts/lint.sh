#!/usr/bin/env bash
# Lint (ruff), type check (mypy), the import rules (scripts/check_imports.py) and the freshness of
# docs/methods.md (scripts/method_reference.py); scripts/test.sh runs this first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/ruff check --quiet jpeft pallas_kernels experiments launch tests scripts
.venv/bin/mypy --no-error-summary
.venv/bin/python scripts/check_imports.py
.venv/bin/python scripts/method_reference.py --check
