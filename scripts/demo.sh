#!/usr/bin/env bash
# The newcomer's path: install, retrain on sample_images/, classify one picture.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python retrain.py --image_dir sample_images
.venv/bin/python label_image.py --graph graphs/sample_images.pb --image sample_images/triangle/triangle_000.jpg
