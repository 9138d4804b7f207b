"""The bases built here by name: the default, and how many blocks above the stem each one that
can be fine-tuned has.

Kept free of TensorFlow so that the command line can use them at once.
"""

from __future__ import annotations

from imageclf.efficientnet_lite import VARIANTS, block_count

#: --tfhub_module when none is given: a general-purpose ImageNet base, chosen by measurement
#: (docs/training.md, "Base models").
DEFAULT_BASE = "efficientnet_lite0"

#: MobileNetV2's inverted-residual blocks above its stem are named block_1 .. block_16.
MOBILENET_BLOCKS = 16

#: Blocks per EfficientNet-Lite variant (16 for lite0, 21 for lite1 and lite2).
EFFICIENTNET_BLOCKS = {name: block_count(variant) for name, variant in VARIANTS.items()}

#: The most any fine-tunable base has.
MAX_BLOCKS = max(MOBILENET_BLOCKS, *EFFICIENTNET_BLOCKS.values())
