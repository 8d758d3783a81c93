#!/usr/bin/env bash
# Create or refresh the project's virtual environment.
# Installs the CPU build of torch where there is no NVIDIA GPU (an unpinned torch pulls a
# multi-GB CUDA build), the default PyPI build (CUDA) where there is one.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  else
    # On these machines pip finds the CPU wheel locally; elsewhere use PyTorch's CPU index.
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" 2>/dev/null \
      && "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 1)" \
      || "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$VENV/bin/python" -m pip install -q -e '.[dev]'
"$VENV/bin/python" -c "import torch, ray; print(f'venv ready: torch {torch.__version__}, ray {ray.__version__}')"
