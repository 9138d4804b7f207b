#!/usr/bin/env bash
# Install, lint, and run the whole test suite (offline; about 10 minutes on 2 cores, most of it the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The tests also cover the optional Beam job.
.venv/bin/python -m pip install --quiet -r requirements-beam.txt
# The page tests drive Debian's Chromium; install it when we can (root on Debian, as in CI).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
