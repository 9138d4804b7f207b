"""How to run LiteRT in the service on this machine: interpreters, threads, batching, workers, int8.

Services with one setting changed each, up at once and loaded in interleaved rounds (upload
traffic from 8 and 32 keep-alive clients, as bench_service.py sends it), so that load from other
work hits them alike:

- ``tf``: the TensorFlow session (the reference);
- ``litert``: the default, one single-threaded interpreter per core, batches as usual;
- ``litert --litert_threads 2``: one interpreter using both cores for each invoke;
- ``litert --batch_size 1``: the interpreter pool alone, no batching;
- ``litert --workers 2``: two processes, one core each.

Then, in-process, full-integer int8 (representative images from the data set, float input and
output) against float32 on the same graph: speed at batch 8 with 1 and 2 threads, and the largest
score difference to the session.

    python benchmarks/bench_runtime.py [--quick] [--graph G.pb] [--image_dir DIR] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_service import (
    load_images,
    make_graph,
    per_s,
    run_load,
    take,
    upload_requests,
    warm_up,
)
from harness import Processes, Run, add_run_flags, machine_line, prepare_imports, resolve_image_dir

SETUPS = {
    "tf": ["--runtime", "tf"],
    "litert": ["--runtime", "litert"],
    "litert_threads_2": ["--runtime", "litert", "--litert_threads", "2"],
    "litert_unbatched": ["--runtime", "litert", "--batch_size", "1"],
    "litert_workers_2": ["--runtime", "litert", "--workers", "2"],
}
CLIENTS = (8, 32)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 96 uploads instead of 5 of 192")
    p.add_argument("--graph", type=Path, help="graph to serve (default: retrain one on sample_images, ~20 s)")
    p.add_argument("--image_dir", type=Path, help="class folders of JPEGs (default: the dogs set, else sample_images)")
    p.add_argument("--output", type=Path, help="JSON file to write (default: under benchmarks/results/)")
    return add_run_flags(p).parse_args(argv)


def command(graphs_dir: Path, image_root: Path, threads: int, extra: list[str]) -> list[str]:
    return ["--graphs_dir", str(graphs_dir), "--image_root", str(image_root),
            "--threads", str(threads), "--grpc_port", "0", *extra]


def bench_services(graph: Path, image_dir: Path, encoded: list[bytes], work: Path, rounds: int, per_round: int
                   ) -> dict:
    graphs_dir = work / "served"  # make_graph writes into work/graphs
    graphs_dir.mkdir()
    (graphs_dir / graph.name).symlink_to(graph.resolve())
    uploads = upload_requests(encoded)
    rates: dict[str, list[float]] = {}
    p99: dict[str, list[float]] = {}
    with Processes(work) as servers:
        for clients in CLIENTS:
            started = {name: servers.start_service(f"{name}-{clients}", command(graphs_dir, image_dir, clients, extra))
                       for name, extra in SETUPS.items()}
            for server in started.values():
                warm_up(server.wait_ready(), uploads, clients)
            for r in range(rounds):
                for name, server in started.items():
                    result = run_load(server.port, take(uploads, r * per_round, per_round), clients)
                    key = f"{name}_{clients}_clients"
                    rates.setdefault(key, []).append(per_s(len(result.latencies), result.seconds))
                    p99.setdefault(key, []).append(result.summary()["latency"]["p99_ms"])
                    if result.errors:
                        raise RuntimeError(f"{key}: {result.errors[0]}")
            for server in started.values():
                server.stop()
    return {"rounds": rounds, "uploads_per_round": per_round,
            "images_per_s": {k: {"median": statistics.median(v), "rounds": v} for k, v in rates.items()},
            "p99_ms_median": {k: statistics.median(v) for k, v in p99.items()}}


def bench_int8(graph: Path, encoded: list[bytes], seconds: float = 3.0) -> dict:
    """Full-integer int8 against float32, in-process, on the same graph and pixels."""
    import numpy as np
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from imageclf.graph_model import GraphModel
    from imageclf.images import decode_image

    model = GraphModel(graph, decode_in_graph=False)
    xs = np.stack([model.model_input(decode_image(d, size=model.input_size)) for d in encoded[:64]])
    reference = model.run(xs)
    with tempfile.TemporaryDirectory() as folder:
        frozen = Path(folder) / "fed.pb"
        frozen.write_bytes(model.graph.as_graph_def().SerializeToString())
        name = model.input.op.name

        def convert(int8: bool) -> bytes:
            converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
                str(frozen), [name], [model.output.op.name], {name: [None, *model.input_size, 3]})
            if int8:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = lambda: ([x[None]] for x in xs[:48])
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            return converter.convert()

        models = {"float32": convert(False), "int8": convert(True)}
    out: dict = {}
    for kind, data in models.items():
        for threads in (1, 2):
            interpreter = Interpreter(model_content=data, num_threads=threads)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, xs.shape)
            interpreter.allocate_tensors()
            interpreter.set_tensor(index, xs)
            interpreter.invoke()
            scores = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
            interpreter.resize_tensor_input(index, (8, *xs.shape[1:]))
            interpreter.allocate_tensors()
            interpreter.set_tensor(index, xs[:8])
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                interpreter.invoke()
                n += 8
            out[f"{kind}_threads_{threads}"] = {
                "batch_8_images_per_s": per_s(n, time.perf_counter() - start), "bytes": len(data),
                "max_score_difference": float(np.abs(scores - reference).max()),
                "top1_agreement": float((scores.argmax(1) == reference.argmax(1)).mean())}
    model.close()
    return out


def format_report(r: dict) -> str:
    lines = [f"Machine: {machine_line(r['machine'])}", "",
             f"Service uploads, {r['services']['rounds']} interleaved rounds of {r['services']['uploads_per_round']}:"]
    for key, value in r["services"]["images_per_s"].items():
        rounds = ", ".join(map(str, value["rounds"]))
        lines.append(f"  {key:<32} median {value['median']:>7.1f} img/s  (rounds {rounds})"
                     f"  p99 {r['services']['p99_ms_median'][key]:.0f} ms")
    lines += ["", "In-process float32 and int8 LiteRT, batch 8:"]
    for key, value in r["int8"].items():
        lines.append(f"  {key:<20} {value['batch_8_images_per_s']:>7.1f} img/s  max score difference to the session "
                     f"{value['max_score_difference']:.2g}, top-1 agreement {value['top1_agreement']:.0%}, "
                     f"{value['bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_imports()
    run = Run("bench_runtime", args)
    image_dir, note = resolve_image_dir(args.image_dir)
    _, encoded = load_images(image_dir.resolve())
    rounds, per_round = (2, 96) if args.quick else (5, 192)
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        work = Path(tmp)
        graph = args.graph.resolve() if args.graph else make_graph(work)
        services = bench_services(graph, image_dir.resolve(), encoded, work, rounds, per_round)
        int8 = bench_int8(graph, encoded)
    results = {"machine": run.end(), "note": note, "image_dir": str(image_dir), "services": services, "int8": int8}
    print(format_report(results))
    run.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
