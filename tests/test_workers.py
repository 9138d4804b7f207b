"""``python -m service --workers N``: real processes on 127.0.0.1 sharing one HTTP and one gRPC port.

Every worker answers, over HTTP and gRPC; the decode budget is split between them; SIGTERM to the
parent stops all of them with exit 0, and so does SIGTERM to every process at once (systemd) while
a request is in flight; a worker that dies is replaced while the other answers, and workers that
keep dying stop the service with exit 1 (its supervisor restarts it); a killed parent leaves no
worker behind; bad flags and a missing graphs folder are refused before anything starts.
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

from tests.demo_data import make_dataset

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

    def workers(self, timeout: float = 120, pids: dict[str, int] | None = None) -> dict[str, dict]:
        """Scrape /metrics on new connections until both workers have answered (with these ``pids``
        for the indexes given): {index: {"pid", "budget", "grpc_calls": GetModelStatus calls answered}}."""
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + timeout

        def done() -> bool:
            return len(seen) == 2 and all(seen.get(i, {}).get("pid") == pid for i, pid in (pids or {}).items())
        while not done() and time.monotonic() < deadline and self.process.poll() is None:
            try:
                text = _get(self.url + "/metrics")[1].decode()
            except OSError:
                time.sleep(0.2)
                continue
            found = re.search(r'imageclf_worker\{pid="(\d+)",worker="(\d+)"\}', text)
            if found and _get(self.url + "/readyz")[0] == 200:
                budget = re.search(r"^imageclf_decode_budget_bytes (\S+)", text, re.M)
                calls = re.findall(r'^imageclf_requests_total\{endpoint="/tensorflow.serving.ModelService/'
                                   r'GetModelStatus",status="\w+"\} (\S+)', text, re.M)
                seen[found[2]] = {"pid": int(found[1]), "budget": float(budget[1]),
                                  "grpc_calls": sum(float(c) for c in calls)}
        assert done(), f"workers seen: {seen}, wanted pids {pids}\n{self.output()[-3000:]}"
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
        # gRPC: new channels, spread by the kernel (SO_REUSEPORT), until each worker has answered
        # some; every call is counted by the worker that answered it, in its own /metrics.
        calls, deadline = 0, time.monotonic() + 120
        while True:
            for _ in range(4):
                with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
                    answer = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": MODEL}), timeout=30)
                    assert answer.model_version_status[0].state == 30  # AVAILABLE
                calls += 1
            answered = {index: w["grpc_calls"] for index, w in service.workers().items()}
            if all(answered.values()) or time.monotonic() > deadline:
                break
        assert all(answered.values()) and sum(answered.values()) == calls, (answered, calls)

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


def _log_match(service: Workers, pattern: str, timeout: float = 60) -> re.Match:
    """The first match of ``pattern`` in the service's output, waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, service.output())
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"never logged: {pattern}\n{service.output()[-3000:]}")


def test_a_killed_worker_is_replaced_while_the_other_answers(graphs, photos, tmp_path):
    service = Workers(graphs, photos, tmp_path / "service.log")
    try:
        workers = service.workers()
        pids = {index: w["pid"] for index, w in workers.items()}
        os.kill(pids["0"], signal.SIGKILL)
        image = next(photos.glob("circle/*.jpg")).read_bytes()
        for _ in range(4):  # worker 1 answers meanwhile, on the shared socket
            status, body = _get(service.url + "/classify", image)
            assert status == 200 and b'"predictions"' in body, body[:300]
        replaced = _log_match(service, rf"worker 0 \(pid {pids['0']}\) was killed by SIGKILL; "
                                       rf"started worker 0 again as pid (\d+)\n")
        new_pid = int(replaced[1])
        assert new_pid not in pids.values()
        # The new worker 0 answers (models loaded, its own /metrics), beside the same worker 1.
        service.workers(pids={"0": new_pid, "1": pids["1"]})
        assert service.process.poll() is None
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=60) == 0, service.output()[-3000:]
        assert _wait_gone([new_pid, pids["1"]], timeout=10)
    finally:
        service.stop()


def test_workers_that_keep_dying_stop_the_service_with_exit_1(graphs, photos, tmp_path):
    from service.workers import RESTART_LIMIT

    service = Workers(graphs, photos, tmp_path / "service.log")
    try:
        started = _log_match(service, r"workers \(pids (\d+), (\d+)\)")
        victim, other = int(started[1]), int(started[2])
        for death in range(1, RESTART_LIMIT + 2):
            os.kill(victim, signal.SIGKILL)
            if death <= RESTART_LIMIT:  # replaced, and killed again while it starts
                victim = int(_log_match(service, rf"\(pid {victim}\) was killed by SIGKILL; "
                                                 rf"started worker 0 again as pid (\d+)\n")[1])
        assert service.process.wait(timeout=60) == 1, service.output()[-3000:]
        assert _wait_gone([victim, other], timeout=30)
        output = service.output()
        assert (f"workers keep dying: {RESTART_LIMIT + 1} exits within 60 s, the last: worker 0 (pid {victim}) "
                "was killed by SIGKILL; stopping the others") in output, output[-3000:]
        assert "Stopped (exit 1)." in output
    finally:
        service.stop()


def _half_sent_upload(port: int, data: bytes) -> tuple[socket.socket, bytes]:
    """A connection with a POST /classify whose body is half sent; returns it and the other half."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    # One whole request first: its answer proves a worker accepted the connection (one still in the
    # listen backlog when the listener closes is reset, which is not what is tested here).
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert _read_response(conn)[0] == 200
    head = (f"POST /classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    conn.sendall(head + data[:len(data) // 2])
    return conn, data[len(data) // 2:]


def _read_response(conn: socket.socket) -> tuple[int, bytes]:
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"Content-Length: (\d+)", raw, re.I)[1]):
        chunk = conn.recv(65536)
        if not chunk:
            break
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]) if head else 0, body


def test_sigterm_to_every_process_still_drains_the_request_in_flight(graphs, photos, tmp_path):
    """What systemd's default KillMode=control-group does: SIGTERM to the main pid, then to every other
    process of the unit's cgroup. Each worker then gets SIGTERM twice (systemd's, and the parent's)."""
    service = Workers(graphs, photos, tmp_path / "service.log")
    try:
        pids = [w["pid"] for w in service.workers().values()]
        data = next(photos.glob("square/*.jpg")).read_bytes()
        conn, rest = _half_sent_upload(service.port, data)
        with conn:
            for pid in [service.process.pid, *pids]:
                os.kill(pid, signal.SIGTERM)
            # Both SIGTERMs have reached both workers (or, without the fix, they stopped at once).
            deadline = time.monotonic() + 30
            while (service.output().count("SIGTERM again: already stopping") < 2 and service.process.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            conn.sendall(rest)
            status, body = _read_response(conn)
        assert status == 200 and b'"predictions"' in body, (status, body[:300], service.output()[-3000:])
        assert service.process.wait(timeout=60) == 0, service.output()[-3000:]
        output = service.output()
        assert output.count("SIGTERM again: already stopping") == 2 and "Traceback" not in output, output[-3000:]
        assert output.count("Stopped.") == 3, output[-3000:]
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


def test_a_missing_graphs_dir_is_one_line_before_any_worker_starts(photos, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "service", "--workers", "2", "--port", str(free_port()),
                           "--grpc_port", "0", "--graphs_dir", str(tmp_path / "nowhere"), "--image_root", str(photos)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"python -m service: error: --graphs_dir {tmp_path / 'nowhere'}: no such "
                                        "folder (run retrain.py first)"], proc.stderr
    assert "workers (pids" not in proc.stdout


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


# -- usable cores: the CPU affinity, capped by the cgroup CPU quota (files written here) --------------


def _cgroup(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup mount at ``tmp_path/cgroup`` holding ``files`` and a /proc/self/cgroup with ``self_cgroup``."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(self_cgroup)
    return root, proc


@pytest.mark.parametrize("self_cgroup, files, cores", [
    # cgroup v2: a pod's CPU limit of 1.5 cores, on its own cgroup.
    ("0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": "150000 100000\n"}, 1.5),
    # v2: no limit on the process's cgroup, 2 cores on an ancestor: the ancestor's bounds it.
    ("0::/a/b\n", {"a/b/cpu.max": "max 100000\n", "a/cpu.max": "200000 100000\n"}, 2.0),
    # v2 in a container (cgroup namespace): the mount's root is the container's own cgroup.
    ("0::/\n", {"cpu.max": "300000 100000\n"}, 3.0),
    # v2 without a limit anywhere.
    ("0::/a\n", {"a/cpu.max": "max 100000\n"}, None),
    # cgroup v1 (the fallback): CFS quota and period of the cpu controller.
    ("4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
     0.5),
    # v1 in a container: /proc/self/cgroup names a host path the container's mount does not have.
    ("3:cpu:/docker/abc\n", {"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
    # v1 without a quota (-1), and a host with no cgroup files at all.
    ("3:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/\n", {}, None),
])
def test_cgroup_cpu_limit_v2_then_v1(tmp_path, self_cgroup, files, cores):
    from service.workers import cgroup_cpu_limit

    assert cgroup_cpu_limit(*_cgroup(tmp_path, self_cgroup, files)) == cores


def test_workers_are_sized_from_the_cgroup_quota_not_the_hosts_cores(tmp_path):
    from service.workers import plan_workers, usable_cores

    affinity = len(os.sched_getaffinity(0))
    root, proc = _cgroup(tmp_path, "0::/pod\n", {"pod/cpu.max": "100000 100000\n"})  # a 1-core limit
    assert usable_cores(root, proc) == 1
    assert plan_workers(2, 1024, 0, 0, usable_cores(root, proc)).intra_op_threads == 1
    root, proc = _cgroup(tmp_path / "big", "0::/pod\n", {"pod/cpu.max": f"{(affinity + 8) * 100000} 100000\n"})
    assert usable_cores(root, proc) == affinity  # a quota above the cores it may run on changes nothing
    root, proc = _cgroup(tmp_path / "half", "0::/pod\n", {"pod/cpu.max": "50000 100000\n"})
    assert usable_cores(root, proc) == 1  # half a core: still one thread

