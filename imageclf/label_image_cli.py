"""``label_image.py``: classify one picture with a frozen graph (upstream flag names)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from imageclf.cli_common import OneLineErrorParser, run
from imageclf.images import DEFAULT_MAX_PIXELS
from imageclf.runtimes import RUNTIMES

DESCRIPTION = """\
Classify one image with a frozen graph.

Graphs written by our retrain.py need only --graph and --image: labels, input size and pixel
scaling are stored inside them. Graphs from the older retrain scripts also need --labels and
their pixel scaling (--input_mean/--input_std), unless a <graph>.json file beside them says so.
"""

EPILOG = """\
Examples:
  python label_image.py --graph graphs/dogs.pb --image poodle.jpg
  python label_image.py --graph retrained_graph.pb --labels retrained_labels.txt --image part.jpg \\
      --input_layer input --output_layer final_result --input_mean 127.5 --input_std 127.5
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="label_image.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", required=True, help="frozen graph (.pb) to use")
    p.add_argument("--image", required=True, help="image file to classify (any common format)")
    p.add_argument("--labels", help="labels file, one per line (default: the labels inside the graph)")
    p.add_argument("--input_layer", help="input tensor name (default: from the graph)")
    p.add_argument("--output_layer", help="output tensor name (default: from the graph, else final_result)")
    p.add_argument("--input_height", type=int, help="input height (default: from the graph)")
    p.add_argument("--input_width", type=int, help="input width (default: from the graph)")
    p.add_argument("--input_mean", type=float, help="pixels p in 0..255 are fed as (p - mean) / std")
    p.add_argument("--input_std", type=float, help="see --input_mean")
    p.add_argument("--top_k", type=int, default=5, help="how many results to print (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (default: %(default)s)")
    p.add_argument("--runtime", choices=RUNTIMES, default="tf",
                   help="tf: a TensorFlow session; litert: LiteRT with XNNPACK, the graph converted once and cached "
                        "(same scores within 1e-4; a graph LiteRT cannot run falls back to tf, saying why) "
                        "(default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.input_height is None) != (args.input_width is None):
        parser.error("give both --input_height and --input_width, or neither")
    if args.top_k <= 0:
        parser.error("--top_k must be positive")
    if args.input_std == 0:
        parser.error("--input_std must not be 0")
    from imageclf.classifier import GraphSettings
    from imageclf.images import decode_image, open_image, read_file
    from imageclf.runtimes import RuntimeOptions, load_classifier

    settings = GraphSettings(input_tensor=args.input_layer, output_tensor=args.output_layer,
                             input_size=(args.input_height, args.input_width) if args.input_height else None,
                             input_mean=args.input_mean, input_std=args.input_std, labels_file=args.labels)
    data = read_file(args.image)
    open_image(data, max_pixels=args.max_pixels, name=args.image)  # a bad picture is reported before the graph loads
    model = load_classifier(args.graph, settings, RuntimeOptions(args.runtime, threads=os.cpu_count() or 1))
    if model.runtime_note:
        print(f"label_image.py: {model.runtime_note}", file=sys.stderr)
    pixels = decode_image(data, max_pixels=args.max_pixels, name=args.image, size=model.input_size)
    started = time.perf_counter()
    probabilities = model.predict([pixels])[0]
    seconds = time.perf_counter() - started
    top = model.top_k(probabilities, args.top_k)
    if args.json:
        print(json.dumps({"image": args.image, "model": {"name": model.name, "version": model.version},
                          "predictions": [{"label": label, "score": score} for label, score in top],
                          "seconds": round(seconds, 4)}, indent=2))
    else:
        width = max(len(label) for label, _ in top)
        for label, score in top:
            print(f"{label:<{width}}  {score:.5f}")
    return 0


def entry_point() -> None:
    sys.exit(run("label_image.py", main))
