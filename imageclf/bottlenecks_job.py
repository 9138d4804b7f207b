"""The bottleneck step of retrain.py as an Apache Beam pipeline: fill the cache on many machines.

    python -m imageclf.bottlenecks_job --image_dir DIR --bottleneck_dir DIR [base flags] [Beam options]

It finds the images by retrain.py's rules and code (dataset.class_folders and files_below: every
non-hidden file below each non-hidden class folder, symlinks leading outside --image_dir left
out unless --follow_symlinks), reads them by its rules and code too (image_files: confined to
--image_dir, --max_file_mb, the header checked first; local paths directly, gs:// through
tf.io.gfile, s3:// once a plugin such as tensorflow-io registers it), decodes them with the one
preprocessing (images.decode_image) and writes bottlenecks.BottleneckCache's folders, entry
names and file format, so ``retrain.py --bottleneck_dir DIR`` afterwards computes nothing.

The stages:
1. list each class folder's files (one element per class folder);
2. hash each file and look its key up in the cache: cached ones are counted and dropped;
3. gather the (order, path, key) still to compute, put them in retrain.py's order and cut them
   into --batch_size batches;
4. per batch, on any worker: read and decode its images, one forward pass, write the entries.

Why step 3 rather than Beam's BatchElements: the CPU kernels give an image's vector slightly
different last bits depending on its position in the batch and on the batch size (measured up
to 5e-6 on the built-in base). Batches formed as retrain.py forms them make the job's entries
the very bytes retrain.py would have written from the same cache.

Beam is imported here only; nothing else in imageclf needs it (requirements-beam.txt).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imageclf.beam_quiet import quiet_beam
from imageclf.cli_common import OneLineErrorParser, quiet_tensorflow, run, unknown_flag_message

quiet_tensorflow()


quiet_beam()  # before Beam is imported: it warns as it loads

try:
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions
except ModuleNotFoundError:
    if __name__ == "__main__":
        sys.exit("python -m imageclf.bottlenecks_job: error: Apache Beam is not installed: "
                 "pip install -r requirements-beam.txt")
    raise

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from imageclf import dataset  # noqa: E402
from imageclf.bases import BaseModel, FrozenGraphSpec, load_base  # noqa: E402
from imageclf.bottlenecks import (  # noqa: E402
    cache_key,
    entry_name,
    pixels_feature_function,
    vector_bytes,
    vector_from_bytes,
    with_runtime,
)
from imageclf.cli_args import (  # noqa: E402
    DEFAULT_BATCH_SIZE,
    add_base_arguments,
    add_file_arguments,
    check_file_arguments,
    file_rules,
    frozen_spec,
)
from imageclf.errors import BadImageError, UserError  # noqa: E402
from imageclf.image_files import FileRules, content_key, read_image_bytes  # noqa: E402
from imageclf.images import decode_image  # noqa: E402
from imageclf.install import child_env  # noqa: E402
from imageclf.preprocess import pack_images  # noqa: E402

PROG = "python -m imageclf.bottlenecks_job"
NAMESPACE = "imageclf.bottlenecks"
SKIPPED = "skipped"
REASON_PREFIX = "skipped: "  # then a BadImageError.reason: one counter per reason
DEFAULT_LOCAL_WORKERS = 2
_DIRECT_RUNNERS = {"directrunner", "direct"}

log = logging.getLogger("imageclf.bottlenecks_job")
_COUNTERS = {name: Metrics.counter(NAMESPACE, name) for name in ("listed", "reused", "computed", SKIPPED)}
# When each stage's work began and ended, in ms since the epoch (min of the one, max of the other),
# so the summary can tell the stages' own time from the workers' start-up.
STAGES = {"look_up": "hashing and cache look-ups", "compute": "decoding and forward passes"}
_SPANS = {stage: (Metrics.distribution(NAMESPACE, f"{stage}_start_ms"),
                  Metrics.distribution(NAMESPACE, f"{stage}_end_ms")) for stage in STAGES}

EPILOG = """\
Every other flag is a Beam pipeline option, passed on as it is (--project, --region,
--temp_location, --sdk_container_image, --flink_master, --direct_running_mode...).

Examples:
  python -m imageclf.bottlenecks_job --image_dir dogs --bottleneck_dir bottlenecks
  python retrain.py --image_dir dogs --bottleneck_dir bottlenecks     # computed 0, reused N
  python -m imageclf.bottlenecks_job --image_dir gs://BUCKET/dogs --bottleneck_dir gs://BUCKET/bottlenecks \\
      --runner DataflowRunner --project PROJECT --region REGION --temp_location gs://BUCKET/tmp \\
      --sdk_container_image REGISTRY/imageclf-beam:TAG
  (or, instead of a container image: pip wheel . --no-deps -w dist, then --extra_package dist/imageclf-*.whl)
"""


# ---------------------------------------------------------------- flags and pipeline options

def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--image_dir", required=True,
                   help="folder with one subfolder of images per class: a local path or gs://...")
    p.add_argument("--bottleneck_dir", required=True,
                   help="the cache to fill: what you give retrain.py as --bottleneck_dir (or gs://... to copy down)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per forward pass; keep retrain.py's for bit-identical vectors (default: %(default)s)")
    add_file_arguments(p.add_argument_group("reading files (the same flags as retrain.py)"))
    p.add_argument("--skipped_list", help="also write the skipped files, one reason a line, to this file")
    add_base_arguments(p.add_argument_group("base model (the same flags as retrain.py)"))
    runner = p.add_argument_group("Beam runner")
    runner.add_argument("--runner", default="DirectRunner",
                        help="DirectRunner (default: worker processes on this machine), DataflowRunner, "
                             "FlinkRunner, SparkRunner...")
    runner.add_argument("--num_workers", type=int,
                        help=f"DirectRunner: worker processes (default: {DEFAULT_LOCAL_WORKERS}); other runners: "
                             "passed on as Beam's --num_workers")
    return p


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the rest for Beam; a flag that is neither ours nor Beam's is named first (with the
    closest one), so that a mistyped --image_dir is not reported as a missing one."""
    parser = build_parser()
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    args, beam_argv = parser.parse_known_args(argv)
    check_beam_flags(PipelineOptions(beam_argv), parser)
    missing = [action.option_strings[0] for action in required if getattr(args, action.dest) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    for flag in ("batch_size", "num_workers"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag} must be positive")
    check_file_arguments(parser, args)
    return args, beam_argv


def is_direct(runner: str) -> bool:
    return runner.lower() in _DIRECT_RUNNERS


def pipeline_options(args: argparse.Namespace, beam_argv: Sequence[str]) -> PipelineOptions:
    """Beam options: ours first, the user's after them (the last one of a flag wins)."""
    flags = [f"--runner={args.runner}"]
    if is_direct(args.runner):
        flags += [f"--direct_num_workers={args.num_workers or DEFAULT_LOCAL_WORKERS}",
                  "--direct_running_mode=multi_processing",
                  # Our skip messages stay; the workers' start-up chatter goes.
                  "--default_sdk_harness_log_level=WARNING",
                  '--sdk_harness_log_level_overrides={"apache_beam": "ERROR", "__main__": "ERROR"}']
    elif args.num_workers:
        flags.append(f"--num_workers={args.num_workers}")
    options = PipelineOptions([*flags, *beam_argv])
    check_beam_flags(options)
    return options


def local_runner(options: PipelineOptions):
    """Beam's local runner, whose worker processes start as ``python -m imageclf.beam_worker`` (Beam's worker,
    quiet) rather than as Beam's own command; None (Beam's choice) for ``--direct_running_mode`` other than
    multi_processing. Beam's runner swaps in its own worker command when the mode is multi_processing, and
    keeps the one given here otherwise, starting ``--direct_num_workers`` workers of it either way: so the
    mode is set to in_memory once the runner is made."""
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    direct.direct_running_mode = "in_memory"
    # The workers' options (their log levels among them), handed over as Beam's DirectRunner does.
    provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(
        pipeline_options=JobServiceHandle.encode_pipeline_options(options.get_all_options())))
    worker = SubprocessSDKEnvironment.from_command_string(f"{sys.executable} -m imageclf.beam_worker")
    return fn_runner.FnApiRunner(default_environment=worker, provision_info=provision)


def check_beam_flags(options: PipelineOptions, parser: argparse.ArgumentParser | None = None) -> None:
    """UserError naming a flag that is neither this job's nor a Beam pipeline option, and the closest flag of
    either: Beam drops flags it does not know with a warning, and a mistyped --project would go unnoticed."""
    known = set(options.get_all_options())
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - known)
    if unknown:
        ours = [option for action in (parser or build_parser())._actions for option in action.option_strings]
        raise UserError(unknown_flag_message(PROG, "--" + unknown[0], [*ours, *("--" + name for name in known)]))


# ---------------------------------------------------------------- paths and files through tf.io.gfile

def is_url(path: str) -> bool:
    return "://" in path


def join(root: str, *parts: str) -> str:
    """``root/part/...``: locally as retrain.py names files (str of a Path), "/"-joined for URLs."""
    if is_url(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def class_folders(image_dir: str, follow_symlinks: bool = False) -> tuple[list[str], list[BadImageError]]:
    """The class folder names in retrain.py's order, and the symlinked ones left out (local
    folders: dataset.class_folders itself; URLs: immediate subfolders, hidden ones left out)."""
    if not tf.io.gfile.isdir(image_dir):
        raise UserError(f"--image_dir {image_dir}: no such folder")
    if is_url(image_dir):
        names = sorted({name.rstrip("/") for name in tf.io.gfile.listdir(image_dir)})
        folders = [name for name in names if not name.startswith(".") and tf.io.gfile.isdir(join(image_dir, name))]
        skipped = []
    else:
        paths, skipped = dataset.class_folders(Path(image_dir), follow_symlinks)
        folders = [path.name for path in paths]
    if not folders:
        raise UserError(f"--image_dir {image_dir}: no class folders found; put each class's "
                        "images in its own subfolder (e.g. dogs/poodle/*.jpg, dogs/pug/*.jpg)")
    return folders, skipped


def files_below(folder: str, rules: FileRules) -> tuple[list[tuple[tuple[str, ...], str]], list[BadImageError]]:
    """(path parts below ``folder``, path) of each file below it, in retrain.py's order (that of
    sorted Paths: part by part), files in hidden folders and hidden files left out; and the
    symlinks left out (local folders: dataset.files_below itself)."""
    if not is_url(folder):
        found, skipped = dataset.files_below(Path(folder), Path(rules.root or folder), rules.follow_symlinks)
        return [(parts, str(path)) for parts, path in found], skipped
    found = []
    for directory, _, names in tf.io.gfile.walk(folder):  # object stores have no symlinks
        below = tuple(part for part in directory[len(folder):].split("/") if part)
        for name in names:
            parts = (*below, name)
            if not any(part.startswith(".") for part in parts):
                found.append((parts, join(folder, *parts)))
    return sorted(found), []


def list_class_folder(element: tuple[int, str], image_dir: str, rules: FileRules) -> Iterator:
    """(class folder index, name) -> ((index, parts), path) for each of its files, the first part
    of each being the file's place in retrain.py's order; symlinks left out go to SKIPPED."""
    index, name = element
    found, skipped = files_below(join(image_dir, name), rules)
    for error in skipped:
        yield beam.pvalue.TaggedOutput(SKIPPED, skip(error))
    for parts, path in found:
        _COUNTERS["listed"].inc()
        yield (index, parts), path


@dataclass(frozen=True)
class CacheFolder:
    """One base's folder of the cache (bottlenecks.BottleneckCache's layout and format), through tf.io.gfile."""

    path: str
    size: int  # the base's bottleneck size: an entry of another size is malformed

    def entry(self, key: str) -> str:
        return join(self.path, *entry_name(key).split("/"))

    def get(self, key: str) -> np.ndarray | None:
        """The cached vector, or None when absent or malformed (as BottleneckCache.get)."""
        try:
            with tf.io.gfile.GFile(self.entry(key), "rb") as f:
                data = f.read()
        except tf.errors.OpError:
            return None
        return vector_from_bytes(data, self.size)

    def put(self, key: str, vector: np.ndarray) -> None:
        path = self.entry(key)
        if is_url(path):
            # An object store shows an object only once its upload is complete: atomic as it is.
            with tf.io.gfile.GFile(path, "wb") as f:
                f.write(vector_bytes(vector))
        else:
            from imageclf.atomic import write_bytes_atomic

            write_bytes_atomic(path, vector_bytes(vector), durable=False)


# ---------------------------------------------------------------- the base, once per worker process

@dataclass(frozen=True)
class BaseSpec:
    """What a worker needs to load the driver's base, and the cache folder name it must come to."""

    handle: str
    frozen: FrozenGraphSpec
    folder: str
    runtime: str = "tf"


_BASES: dict[tuple[str, FrozenGraphSpec], BaseModel] = {}
_BASES_LOCK = threading.Lock()


def shared_base(spec: BaseSpec) -> BaseModel:
    """The base, loaded once per process however many DoFn instances (threads) a runner makes."""
    with _BASES_LOCK:
        if (spec.handle, spec.frozen) not in _BASES:
            _BASES[spec.handle, spec.frozen] = with_runtime(load_base(spec.handle, spec.frozen), spec.runtime)[0]
        base = _BASES[spec.handle, spec.frozen]
    if cache_key(base) != spec.folder:
        raise RuntimeError(f"the base {spec.handle} on this worker is not the one the job started with, or its "
                           f"decoders or runtime are other versions (cache folder {cache_key(base)}, expected "
                           f"{spec.folder}): give every worker the same base files, Pillow, TensorFlow and "
                           "ai-edge-litert")
    return base


# ---------------------------------------------------------------- the pipeline's steps

@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Record the span of one piece of a stage's work (see _SPANS)."""
    start = time.time()
    yield
    started, ended = _SPANS[stage]
    started.update(int(start * 1000))
    ended.update(int(time.time() * 1000))


def skip(error: BadImageError) -> str:
    """Count (in all and by reason) and log one unusable file, as retrain.py lists it; returns its message."""
    _COUNTERS[SKIPPED].inc()
    Metrics.counter(NAMESPACE, REASON_PREFIX + error.reason).inc()
    log.warning("skipped %s", error)
    return str(error)


class LookUp(beam.DoFn):
    """(order, path) -> (order, path, key) for files not in the cache yet; cached ones are counted."""

    def __init__(self, cache: CacheFolder, rules: FileRules):
        self.cache, self.rules = cache, rules

    def process(self, element: tuple[tuple, str]) -> Iterator:
        order, path = element
        with timed("look_up"):
            try:
                key = content_key(path, self.rules)
            except BadImageError as e:
                yield beam.pvalue.TaggedOutput(SKIPPED, skip(e))
                return
            cached = self.cache.get(key) is not None
        if cached:
            _COUNTERS["reused"].inc()
        else:
            yield order, path, key


def plan_batches(todo: Iterable[tuple[tuple, str, str]], batch_size: int) -> Iterator[list[tuple[str, str, bool]]]:
    """retrain.py's batches: the files still to compute in its order, cut every ``batch_size``.

    Items are (path, key, write). Of several files with the same bytes only the last one's vector
    is written, as in retrain.py, where the last write wins.
    """
    ordered = sorted(todo)
    last = {key: i for i, (_, _, key) in enumerate(ordered)}
    items = [(path, key, last[key] == i) for i, (_, path, key) in enumerate(ordered)]
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


class ComputeBatch(beam.DoFn):
    """One batch: read and decode its images (threads), one forward pass, write the cache entries."""

    def __init__(self, base: BaseSpec, cache: CacheFolder, max_pixels: int, rules: FileRules):
        self.base_spec, self.cache, self.max_pixels, self.rules = base, cache, max_pixels, rules

    def setup(self) -> None:
        self.base = shared_base(self.base_spec)
        self.features = pixels_feature_function(self.base)
        # As retrain.py: reading and decoding overlap (gs:// reads wait on the network, not a core).
        self.pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2))

    def teardown(self) -> None:
        self.pool.shutdown()

    def process(self, batch: list[tuple[str, str, bool]]) -> Iterator:
        with timed("compute"):
            yield from self.compute(batch)

    def compute(self, batch: list[tuple[str, str, bool]]) -> Iterator:
        decoded = list(self.pool.map(self.decode, [path for path, _, _ in batch]))
        good = []
        for (_, _, write), result in zip(batch, decoded, strict=True):
            if isinstance(result, BadImageError):
                yield beam.pvalue.TaggedOutput(SKIPPED, skip(result))
            else:
                good.append((write, *result))
        if not good:
            return
        vectors = self.features(*pack_images([pixels for _, _, pixels in good]))
        for (write, key, _), vector in zip(good, vectors, strict=True):
            if write:
                self.cache.put(key, vector)  # the hash of the bytes just decoded, as retrain.py files it
        _COUNTERS["computed"].inc(len(good))

    def decode(self, path: str) -> tuple[str, np.ndarray] | BadImageError:
        """(hash of the bytes decoded, pixels): one read serves both."""
        try:
            key, data = read_image_bytes(path, self.rules)
            return key, decode_image(data, self.max_pixels, name=path, size=self.base.input_size)
        except BadImageError as e:
            return e


def build_pipeline(pipeline: beam.Pipeline, args: argparse.Namespace, folders: list[str],
                   base: BaseSpec, cache: CacheFolder, skipped_folders: Sequence[BadImageError] = ()) -> None:
    rules = file_rules(args)
    listed = (pipeline
              | "Class folders" >> beam.Create(list(enumerate(folders)))
              | "List files" >> beam.FlatMap(list_class_folder, args.image_dir, rules).with_outputs(SKIPPED,
                                                                                                   main="files"))
    files = listed.files | "Spread files" >> beam.Reshuffle()
    looked_up = files | "Hash and look up" >> beam.ParDo(LookUp(cache, rules)).with_outputs(SKIPPED, main="todo")
    computed = (looked_up.todo
                | "Gather" >> beam.combiners.ToList()
                | "Cut into batches" >> beam.FlatMap(plan_batches, args.batch_size)
                | "Spread batches" >> beam.Reshuffle()
                | "Decode and run the base" >> beam.ParDo(ComputeBatch(base, cache, args.max_pixels, rules))
                .with_outputs(SKIPPED, main="done"))
    # Class folders the driver left out are counted in the pipeline too, so every skip has one tally.
    folders_left_out = (pipeline | "Skipped class folders" >> beam.Create(list(skipped_folders))
                        | "Count skipped folders" >> beam.Map(skip))
    if args.skipped_list:
        _ = ((folders_left_out, listed[SKIPPED], looked_up[SKIPPED], computed[SKIPPED])
             | "All skipped" >> beam.Flatten()
             | "Write skipped" >> beam.io.WriteToText(args.skipped_list, num_shards=1, shard_name_template=""))


# ---------------------------------------------------------------- running it

@dataclass
class JobMetrics:
    counts: dict[str, int]
    spans: dict[str, float]  # seconds from the first piece of a stage's work to the end of its last


def job_metrics(result: beam.runners.runner.PipelineResult) -> JobMetrics:
    """The job's counters and stage spans; committed values where the runner has them."""
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counts = {name: 0 for name in _COUNTERS}
    for counter in found["counters"]:
        counts[counter.key.metric.name] = counts.get(counter.key.metric.name, 0) + int(_value(counter))
    edges = {d.key.metric.name: _value(d) for d in found["distributions"]}
    spans = {}
    for stage in STAGES:
        start, end = edges.get(f"{stage}_start_ms"), edges.get(f"{stage}_end_ms")
        if start is not None and end is not None and start.count:
            spans[stage] = (end.max - start.min) / 1000
    return JobMetrics(counts, spans)


def _value(result):
    try:
        value = result.committed
    except Exception:  # noqa: BLE001 - runners without committed metrics raise various errors
        value = None
    return value if value is not None else result.attempted


def summary(metrics: JobMetrics, seconds: float, cache: CacheFolder, skipped_list: str | None) -> str:
    found = metrics.counts
    lines = [f"Bottlenecks: computed {found['computed']:,}, reused {found['reused']:,}, "
             f"skipped {found[SKIPPED]:,} (cache {cache.path})",
             f"Done in {seconds:.1f} s: {found['listed']:,} files, {found['listed'] / seconds:.1f} images/s "
             f"({found['computed'] / seconds:.1f} computed/s, worker start-up included)"]
    stages = [f"{STAGES[stage]} {span:.1f} s" for stage, span in metrics.spans.items()]
    if "compute" in metrics.spans and metrics.spans["compute"] > 0:
        stages[-1] += f" ({found['computed'] / metrics.spans['compute']:.1f} computed/s)"
    if stages:
        lines.append("  stages, first to last piece of work: " + ", ".join(stages))
    if found[SKIPPED]:
        where = f"listed in {skipped_list}" if skipped_list else "named in the log above"
        reasons = sorted(((n, name[len(REASON_PREFIX):]) for name, n in found.items()
                          if name.startswith(REASON_PREFIX) and n), key=lambda item: (-item[0], item[1]))
        lines.append(f"Skipped {found[SKIPPED]:,} file(s): {', '.join(f'{n:,} {why}' for n, why in reasons)}; "
                     f"{where}.")
    return "\n".join(lines)


def _importable_by_local_workers() -> None:
    """Local worker processes start a fresh Python with this environment: installed, imageclf is importable
    there as it is; from a clone, its root goes on PYTHONPATH (install.child_env). Remote workers need the
    package itself: --sdk_container_image, or --extra_package with the wheel of `pip wheel . --no-deps`."""
    os.environ.update(child_env())


def main(argv: Sequence[str] | None = None) -> int:
    args, beam_argv = parse(argv)
    options = pipeline_options(args, beam_argv)
    folders, skipped_folders = class_folders(args.image_dir, args.follow_symlinks)
    spec = frozen_spec(args)
    # Here first: bad flags fail before any worker starts. Workers then run the base as this does.
    base, why_not = with_runtime(load_base(args.tfhub_module, spec), args.runtime)
    if why_not:
        print(f"Note: {why_not}", flush=True)
    _BASES[args.tfhub_module, spec] = base  # an in-process runner uses it as it is
    cache = CacheFolder(join(args.bottleneck_dir, cache_key(base)), base.bottleneck_size)
    print(f"Base model: {base.description} ({base.input_size[0]}x{base.input_size[1]}, "
          f"{base.bottleneck_size} features)\n{len(folders)} class folders in {args.image_dir}; runner {args.runner}",
          flush=True)
    if is_direct(args.runner):
        _importable_by_local_workers()
        # The runner forwards each worker's log lines, which the workers already print themselves.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    started = time.monotonic()
    pipeline = beam.Pipeline(runner=local_runner(options) if is_direct(args.runner) else None, options=options)
    build_pipeline(pipeline, args, folders, BaseSpec(args.tfhub_module, spec, cache_key(base), base.runtime), cache,
                   skipped_folders)
    result = pipeline.run()
    state = result.wait_until_finish()
    print(summary(job_metrics(result), time.monotonic() - started, cache, args.skipped_list), flush=True)
    if state != beam.runners.runner.PipelineState.DONE:
        print(f"{PROG}: error: the pipeline ended in state {state}", file=sys.stderr)
        return 1
    return 0


def entry_point() -> None:
    sys.exit(run(PROG, main))


if __name__ == "__main__":
    # Beam pickles DoFns by reference to their module; defined in __main__ they would be pickled
    # by value instead. Run them under the module's own name, which workers import.
    from imageclf import bottlenecks_job

    bottlenecks_job.entry_point()
