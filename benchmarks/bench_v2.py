"""What the Open Inference Protocol v2 route costs per request over TF Serving's REST route.

One ``python -m service`` (HTTP only), one keep-alive client, one JPEG, three ways of asking
for its scores, interleaved request by request so that load from other work hits all alike:

- ``v1``: ``POST /v1/models/NAME:predict``, ``{"instances": [{"b64": ...}]}``;
- ``v2-binary``: ``POST /v2/models/NAME/infer``, the image as a binary BYTES tensor after the
  JSON header (``Inference-Header-Content-Length``), outputs binary: what tritonclient.http sends;
- ``v2-json``: the same with the image as base64 text (``content_type: base64``) and JSON outputs.

The requests are built by hand with http.client (the same client cost for all three); the
answers are checked to hold the same scores. Reports p50, p90 and the mean in milliseconds.

    python benchmarks/bench_v2.py [--requests 200] [--graph G.pb] [--image PHOTO.jpg] [--output FILE.json]

All traffic goes to 127.0.0.1; the service is stopped at the end, on errors too.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from bench_service import graphs_dir_with, make_graph, service_cmd
from harness import DEFAULT_IMAGE_DIR, HOST, REPO_ROOT, Processes, Run, add_run_flags, machine_line, percentiles

WARM_UP = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="requests of each kind (default 200)")
    p.add_argument("--graph", type=Path, help="graph to serve (default: retrain one on sample_images, ~20 s)")
    p.add_argument("--image", type=Path, help="the JPEG to send (default: a photo of ../shared, else a sample image)")
    p.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results/bench_v2-HOST-TIME.json)")
    return add_run_flags(p).parse_args(argv)


def default_image() -> Path:
    photos = sorted(DEFAULT_IMAGE_DIR.glob("*/*.jpg")) if DEFAULT_IMAGE_DIR.is_dir() else []
    return photos[0] if photos else sorted((REPO_ROOT / "sample_images").glob("*/*.jpg"))[0]


def requests(model: str, image: bytes) -> dict[str, tuple[str, bytes, dict]]:
    """Path, body and headers of each kind of request."""
    b64 = base64.b64encode(image).decode()
    v1 = json.dumps({"instances": [{"b64": b64}]}).encode()
    raw = struct.pack("<I", len(image)) + image
    header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "scores", "parameters": {"binary_data": True}}]}).encode()
    v2_json = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [b64],
                                      "parameters": {"content_type": "base64"}}],
                          "outputs": [{"name": "scores"}]}).encode()
    json_type = {"Content-Type": "application/json"}
    return {"v1": (f"/v1/models/{model}:predict", v1, json_type),
            "v2-binary": (f"/v2/models/{model}/infer", header + raw,
                          {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}),
            "v2-json": (f"/v2/models/{model}/infer", v2_json, json_type)}


def scores(kind: str, response: http.client.HTTPResponse, body: bytes) -> list[float]:
    if kind == "v1":
        return json.loads(body)["predictions"][0]["scores"]
    length = response.getheader("Inference-Header-Content-Length")
    if length is None:
        return json.loads(body)["outputs"][0]["data"]
    raw = body[int(length):]
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def measure(port: int, kinds: dict[str, tuple[str, bytes, dict]], n: int) -> dict[str, list[float]]:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    answers: dict[str, list[float]] = {}
    try:
        for i in range(WARM_UP + n):
            for kind, (path, body, headers) in kinds.items():
                started = time.perf_counter()
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                elapsed = time.perf_counter() - started
                if response.status != 200:
                    raise RuntimeError(f"{kind}: {response.status} {data[:300]!r}")
                if i >= WARM_UP:
                    times[kind].append(elapsed * 1000)
                answers.setdefault(kind, scores(kind, response, data))
    finally:
        conn.close()
    reference = answers["v1"]
    for kind, got in answers.items():
        if max(abs(a - b) for a, b in zip(got, reference, strict=True)) > 1e-5:
            raise RuntimeError(f"{kind} answers other scores than v1: {got} vs {reference}")
    return times


def summary(values: list[float]) -> dict:
    p = percentiles(values, (50, 90))
    return {"p50_ms": round(p[50], 3), "p90_ms": round(p[90], 3), "mean_ms": round(statistics.fmean(values), 3),
            "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_v2", args, light=True)
    image = args.image or default_image()
    data = image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bench_v2_") as tmp:
        work = Path(tmp)
        graph = args.graph or make_graph(work)
        with Processes(work) as servers:
            server = servers.start_service("service", service_cmd(graphs_dir_with(graph, work), work, 8)).wait_ready()
            times = measure(server.port, requests(graph.stem, data), args.requests)
    machine = run.end()
    results = {"machine": machine, "image": {"path": str(image), "bytes": len(data)},
               "requests_each": args.requests, "interleaved": True, "clients": 1,
               "results": {kind: summary(values) for kind, values in times.items()}}
    base = results["results"]["v1"]["p50_ms"]
    for kind, row in results["results"].items():
        row["p50_vs_v1_ms"] = round(row["p50_ms"] - base, 3)
        print(f"{kind:10s} p50 {row['p50_ms']:7.2f} ms  p90 {row['p90_ms']:7.2f} ms  mean {row['mean_ms']:7.2f} ms"
              f"  (p50 {row['p50_vs_v1_ms']:+.2f} ms vs v1)")
    print(machine_line(machine))
    run.write(results, label=f"image {image} ({len(data):,} bytes); results: ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
