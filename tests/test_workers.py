"""``python -m service --workers N``: real processes on 127.0.0.1 sharing one HTTP and one gRPC port.

Every worker answers; the decode budget is split between them; SIGTERM to the parent stops all
of them with exit 0; a worker that dies takes the service down with exit 1 (its supervisor
restarts it); a killed parent leaves no worker behind; bad flags are refused before anything starts.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from imageclf.demo_data import make_dataset

from .conftest import REPO, free_port, tiny_graphs_dir

MODEL = "shapes"
BUDGET_MB = 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers_photos")
    make_dataset(root, per_class=8)
    return root


@pytest.fixture(scope="module")
def graphs(photos, tiny_module, tmp_path_factory) -> Path:
    return tiny_graphs_dir(photos, tiny_module, tmp_path_factory.mktemp("workers_model"), MODEL)


class Workers:
    """``python -m service --workers 2``, its output in a file."""

    def __init__(self, graphs: Path, photos: Path, log: Path, grpc_port: int = 0):
        self.port, self.grpc_port, self.log = free_port(), grpc_port, log
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "--workers", "2", "--threads", "2", "--port", str(self.port),
                 "--grpc_port", str(grpc_port), "--graphs_dir", str(graphs), "--image_root", str(photos),
                 "--memory_budget_mb", str(BUDGET_MB)], cwd=REPO, stdout=out, stderr=out)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self, timeout: float = 120) -> dict[str, dict]:
        """Scrape /metrics on new connections until both workers have answered: {index: metrics}."""
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < 2 and time.monotonic() < deadline and self.process.poll() is None:
            try:
                text = _get(self.url + "/metrics")[1].decode()
            except OSError:
                time.sleep(0.2)
                continue
            found = re.search(r'imageclf_worker\{pid="(\d+)",worker="(\d+)"\}', text)
            if found and _get(self.url + "/readyz")[0] == 200:
                budget = re.search(r"^imageclf_decode_budget_bytes (\S+)", text, re.M)
                seen[found[2]] = {"pid": int(found[1]), "budget": float(budget[1])}
        assert len(seen) == 2, f"workers seen: {seen}\n{self.output()[-3000:]}"
        return seen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def _get(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for whoever adopted it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_gone(pids, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def test_both_workers_answer_http_and_grpc_and_sigterm_stops_all(graphs, photos, tmp_path):
    service = Workers(graphs, photos, tmp_path / "service.log", grpc_port=free_port())
    try:
        workers = service.workers()
        pids = [w["pid"] for w in workers.values()]
        for pid in pids:  # the parent's children, not strays
            assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == service.process.pid
        # The flag bounds the whole service: each worker holds half of it.
        assert [w["budget"] for w in workers.values()] == [(BUDGET_MB // 2) << 20] * 2
        image = next(photos.glob("circle/*.jpg")).read_bytes()
        for _ in range(6):  # new connections, spread by the kernel
            status, body = _get(service.url + "/classify", image)
            assert status == 200 and b'"predictions"' in body, body[:300]
        status, body = _get(service.url + "/classify", b"%PDF-1.4 not an image")
        assert status == 415, body
        for _ in range(4):
            with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
                answer = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                    get_model_status_pb2.GetModelStatusRequest(model_spec={"name": MODEL}), timeout=30)
                assert answer.model_version_status[0].state == 30  # AVAILABLE

        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=60) == 0, service.output()[-3000:]
        assert _wait_gone(pids, timeout=10), service.output()[-3000:]
        with pytest.raises(OSError):
            _get(service.url + "/healthz")  # the port is closed with the last worker
        output = service.output()
        assert "SIGTERM: stopping 2 workers" in output and "Traceback" not in output, output[-3000:]
        assert output.count("Stopped.") == 3, output[-3000:]  # each worker, then the parent
    finally:
        service.stop()


def test_a_dead_worker_stops_the_service_with_exit_1(graphs, photos, tmp_path):
    service = Workers(graphs, photos, tmp_path / "service.log")
    try:
        first, second = (w["pid"] for w in service.workers().values())
        os.kill(first, signal.SIGKILL)
        assert service.process.wait(timeout=60) == 1, service.output()[-3000:]
        assert _wait_gone([second], timeout=10)
        assert f"worker pid {first} exited with code -9; stopping the others" in service.output()
    finally:
        service.stop()


def test_a_killed_parent_leaves_no_worker_behind(graphs, photos, tmp_path):
    service = Workers(graphs, photos, tmp_path / "service.log")
    try:
        pids = [w["pid"] for w in service.workers().values()]
        service.process.kill()
        service.process.wait(timeout=30)
        assert _wait_gone(pids, timeout=30), service.output()[-3000:]
    finally:
        service.stop()


def test_sigterm_while_the_workers_start_is_a_clean_stop(graphs, photos, tmp_path):
    service = Workers(graphs, photos, tmp_path / "service.log")
    try:
        deadline = time.monotonic() + 30
        while "workers (pids" not in service.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p) for p in re.search(r"workers \(pids ([\d, ]+)\)", service.output())[1].split(", ")]
        service.process.send_signal(signal.SIGTERM)  # the workers are still importing TensorFlow
        assert service.process.wait(timeout=60) == 0, service.output()[-3000:]
        assert _wait_gone(pids, timeout=10)
    finally:
        service.stop()


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "--workers must be positive"),
    (["--workers", "2", "--intra_op_threads", "-1"], "--intra_op_threads and --inter_op_threads not negative"),
    (["--workers", "2", "--listen_fd", "3"], "--workers cannot be combined with --listen_fd"),
])
def test_bad_flag_combinations_are_refused(flags, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "service", "--graphs_dir", str(tmp_path), *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_port_in_use_is_one_clear_error_and_starts_no_worker(graphs, photos):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "service", "--workers", "2", "--port", str(port),
                               "--grpc_port", "0", "--graphs_dir", str(graphs), "--image_root", str(photos)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and f"--port {port}" in proc.stderr, proc.stderr
    assert "in use" in proc.stderr and "Traceback" not in proc.stderr and "workers (pids" not in proc.stdout
