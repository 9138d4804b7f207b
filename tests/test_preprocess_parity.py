"""The Python preprocessing (Pillow, no TensorFlow) and its TensorFlow twin give the same model input."""

from __future__ import annotations

import numpy as np
import pytest

from imageclf.preprocess import image_to_model_input
from imageclf.preprocess_graph import to_model_input

# Shrinking by small and large factors, odd sides, extreme aspect ratios, no change, and growing.
SHAPES = [(320, 427), (161, 500), (1200, 1600), (37, 1000), (2000, 31), (160, 160), (100, 90), (7, 5)]


@pytest.mark.parametrize("size", [(160, 160), (224, 224), (128, 96)])
def test_pillow_resize_matches_tensorflow_antialiased_resize(size):
    rng = np.random.default_rng(7)
    for shape in SHAPES:
        pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ours = image_to_model_input(pixels, size)
        theirs = to_model_input(pixels, size).numpy()
        assert ours.dtype == np.float32 and ours.shape == (*size, 3)
        # TensorFlow computes the filter weights in float32, Pillow in float64: 1.4e-5 at most on noise.
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=3e-5, err_msg=f"{shape} -> {size}")


def test_smooth_photo_like_pixels_match_too():
    # Random noise is the worst case for a filter; a gradient with an edge is what photos look like.
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([(x * 255 // 639), (y * 255 // 479), np.where(x > y, 230, 20)], -1).astype(np.uint8)
    np.testing.assert_allclose(image_to_model_input(pixels, (160, 160)), to_model_input(pixels, (160, 160)).numpy(),
                               rtol=0, atol=1e-5)


def test_the_python_path_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from imageclf.preprocess import image_to_model_input; "
            "image_to_model_input(np.zeros((50, 60, 3), np.uint8), (16, 16)); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.strip() == "False"
