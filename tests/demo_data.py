"""A generated demo data set: photos of nothing, but honest ones we may redistribute.

Each class is a kind of shape (circle, square, triangle, star) drawn in a random colour, size,
position and rotation over a noisy, randomly tinted background. The images are made by code,
so they carry no third-party rights (we dedicate them to the public domain, CC0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: The shapes of the demo set (sample_images/ has these three).
SHAPES = ("circle", "square", "triangle")
#: Every shape draw_shape knows.
ALL_SHAPES = (*SHAPES, "star")
_STAR_INNER = 0.4  # inner/outer radius of the star: thin enough to tell from a pentagon


def draw_shape(kind: str, rng: np.random.Generator, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """One picture of ``kind`` (one of ALL_SHAPES); ValueError for any other name."""
    if kind not in ALL_SHAPES:
        raise ValueError(f"unknown shape {kind!r}; choose from {', '.join(ALL_SHAPES)}")
    width, height = size
    tint = rng.integers(0, 256, 3)
    noise = rng.normal(0, 25, (height, width, 3))
    background = np.clip(tint * 0.5 + 64 + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(background).filter(ImageFilter.GaussianBlur(1.5))
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.22, 0.4) * min(size)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    colour = tuple(int(c) for c in (255 - tint + rng.integers(-40, 40, 3)).clip(0, 255))
    if kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        # Same draws in the same order for every polygon, so existing pictures stay as they were.
        turn = rng.uniform(0, 2 * math.pi)
        draw.polygon(_polygon(kind, cx, cy, radius, turn), fill=colour)
    return img


def _polygon(kind: str, cx: float, cy: float, radius: float, turn: float) -> list[tuple[float, float]]:
    if kind == "star":  # five points: corners alternate between the outer and the inner radius
        radii = [radius if i % 2 == 0 else radius * _STAR_INNER for i in range(10)]
    else:
        radii = [radius] * (4 if kind == "square" else 3)
    n = len(radii)
    return [(cx + r * math.cos(turn + 2 * math.pi * i / n), cy + r * math.sin(turn + 2 * math.pi * i / n))
            for i, r in enumerate(radii)]


def make_dataset(root: str | Path, per_class: int = 24,
                 classes: Sequence[str] | Mapping[str, str] = SHAPES,
                 seed: int = 0, start: int = 0) -> list[Path]:
    """Write ``per_class`` JPEGs for each class under ``root/<class>/``; returns the paths.

    ``classes`` names shapes (each becomes its own folder), or maps folder names to shapes
    (``{"pug": "circle", "husky": "square"}``) for tests that need particular folder names.
    Raises ValueError for a name that is not a shape, before writing anything.
    """
    folders = dict(classes) if isinstance(classes, Mapping) else {kind: kind for kind in classes}
    unknown = sorted(set(folders.values()) - set(ALL_SHAPES))
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_SHAPES)}")
    written = []
    for c, (name, kind) in enumerate(folders.items()):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            rng = np.random.default_rng([seed, c, i])
            path = folder / f"{name}_{i:03d}.jpg"
            draw_shape(kind, rng).save(path, quality=90)
            written.append(path)
    return written
