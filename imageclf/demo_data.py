"""A generated demo data set: photos of nothing, but honest ones we may redistribute.

Each class is a kind of shape (circle, square, triangle) drawn in a random colour, size,
position and rotation over a noisy, randomly tinted background. The images are made by code,
so they carry no third-party rights (we dedicate them to the public domain, CC0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle")


def draw_shape(kind: str, rng: np.random.Generator, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """One picture of ``kind`` (see SHAPES)."""
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
        corners = 4 if kind == "square" else 3
        turn = rng.uniform(0, 2 * math.pi)
        points = [(cx + radius * math.cos(turn + 2 * math.pi * i / corners),
                   cy + radius * math.sin(turn + 2 * math.pi * i / corners)) for i in range(corners)]
        draw.polygon(points, fill=colour)
    return img


def make_dataset(root: str | Path, per_class: int = 24, classes: tuple[str, ...] = SHAPES,
                 seed: int = 0, start: int = 0) -> list[Path]:
    """Write ``per_class`` JPEGs for each class under ``root/<class>/``; returns the paths."""
    written = []
    for c, kind in enumerate(classes):
        folder = Path(root) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            rng = np.random.default_rng([seed, c, i])
            path = folder / f"{kind}_{i:03d}.jpg"
            draw_shape(kind, rng).save(path, quality=90)
            written.append(path)
    return written
