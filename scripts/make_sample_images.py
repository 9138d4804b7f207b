#!/usr/bin/env python3
"""Regenerate sample_images/ (a small generated demo set, public domain) with tests/demo_data.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.demo_data import make_dataset  # noqa: E402

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent / "sample_images"
    paths = make_dataset(root, per_class=30)
    print(f"wrote {len(paths)} images under {root}")
