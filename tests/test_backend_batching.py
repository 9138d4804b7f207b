"""``--batch_timeout_s`` under ``--backend``: a request waiting for a backend call led by another request
gives up after ``--batch_timeout_s`` (503), as with a local model; it used to be replaced by the
backend's own bound (2 x ``--backend_timeout_s`` + 1) and ignored.

A real gRPC backend on 127.0.0.1 (test_backend's HostileBackend) whose Predict is made slow, and
the front's app as ``python -m service --backend`` builds it.
"""

from __future__ import annotations

import threading

from imageclf.engine.backend_config import BackendOptions
from service.app import ServiceConfig, create_app

from .conftest import REPO
from .test_backend import PICTURE, HostileBackend


def test_a_request_waiting_for_a_slow_backend_call_gives_up_after_batch_timeout_s():
    backend = HostileBackend()
    # Batches of 2: a request that joins one led by another waits for the leader's call. The leader
    # waits for company until its batch is full (or the running call ends), so the second request joins.
    config = ServiceConfig(image_root=str(REPO / "sample_images"), batch_size=2, batch_wait_ms=60_000,
                           batch_timeout_s=1.0, backend=BackendOptions(url=backend.url, models=("m",),
                                                                       timeout_s=10, poll_seconds=60))
    app = create_app(config)
    answers: dict[str, tuple[int, dict]] = {}

    def get(name: str) -> None:
        response = app.test_client().get(PICTURE)
        answers[name] = (response.status_code, response.json)
    try:
        assert app.test_client().get(PICTURE).status_code == 200  # metadata and labels fetched
        calls = backend.calls["Predict"]
        backend.hang["Predict"] = 6  # each call from now on: 6 s, well within the 10 s deadline
        first = threading.Thread(target=get, args=("first",))
        first.start()
        while backend.calls["Predict"] == calls:  # its call is running: the next batch waits for company
            first.join(0.01)
            assert first.is_alive(), answers
        pair = [threading.Thread(target=get, args=(name,)) for name in ("b", "c")]
        for thread in pair:
            thread.start()
        for thread in [first, *pair]:
            thread.join(60)
        statuses = sorted(answers[name][0] for name in ("b", "c"))
        # One led the second batch and got its call's answer; the other joined it and gave up after 1 s.
        assert answers["first"][0] == 200 and statuses == [200, 503], answers
        (refused,) = [answer for status, answer in answers.values() if status == 503]
        assert "did not answer within 1 s" in refused["error"], refused
    finally:
        backend.close()
        app.extensions["imageclf"]["registry"].stop()
