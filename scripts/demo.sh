#!/usr/bin/env bash
# The newcomer's path: install, retrain on sample_images/, classify one picture, then serve.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python retrain.py --image_dir sample_images
.venv/bin/python label_image.py --graph graphs/sample_images.pb --image sample_images/triangle/triangle_000.jpg
cat <<'TRY'

Starting the service on http://127.0.0.1:8000/ (Ctrl-C to stop). In another terminal, try:
  curl 'localhost:8000/?file=sample_images/circle/circle_000.jpg'
  curl -F image=@sample_images/square/square_000.jpg localhost:8000/classify
  curl localhost:8000/models
or open http://127.0.0.1:8000/ in a browser and drop a picture on the page.
TRY
exec .venv/bin/python -m service --graphs_dir graphs --image_root .
