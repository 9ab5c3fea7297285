#!/usr/bin/env bash
# The test suite (CI runs exactly this): lint, type check and import rules (scripts/lint.sh), then
# pytest. Extra arguments go to pytest, e.g. -m "not slow".
# Two workers (pytest-xdist), one test file per worker at a time so that a module's fixtures are
# built once: most of the suite is single-threaded tracing and compiling, so two cores halve it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/lint.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
