"""Micro-batching with real threads: concurrent submissions share batches, errors reach everyone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imageclf.batching import MicroBatcher


def test_concurrent_items_are_batched_and_each_gets_its_own_result():
    sizes = []

    def run(items):
        sizes.append(len(items))
        time.sleep(0.02)  # a model call takes a while; others queue up meanwhile
        return [item * 10 for item in items]
    batcher = MicroBatcher(run, max_batch=8, max_wait=0.01)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(batcher.submit, range(64)))
    assert results == [i * 10 for i in range(64)]
    assert sum(sizes) == 64 and max(sizes) <= 8 and len(sizes) < 32


def test_a_lone_item_runs_without_waiting_for_company():
    batcher = MicroBatcher(lambda items: items, max_batch=32, max_wait=5.0)
    started = time.perf_counter()
    assert batcher.submit("x") == "x"
    assert time.perf_counter() - started < 1.0  # nothing else was running, so no reason to wait 5 s


def _holding_runner(batches, fail=False):
    """A run_batch whose first call, on ["hold"], keeps running until released; records every batch."""
    holding, release = threading.Event(), threading.Event()

    def run(items):
        batches.append(list(items))
        if items == ["hold"]:
            holding.set()
            release.wait(10)
        elif fail and 7 not in items:
            raise ValueError("bad batch")
        return items
    return run, holding, release


def test_errors_reach_every_member_and_the_batcher_recovers():
    batches = []
    run, holding, release = _holding_runner(batches, fail=True)
    batcher = MicroBatcher(run, max_batch=4, max_wait=5.0)  # the 4th arrival closes the batch
    with ThreadPoolExecutor(5) as pool:
        held = pool.submit(batcher.submit, "hold")
        assert holding.wait(10)
        futures = [pool.submit(batcher.submit, i) for i in range(4)]
        errors = [f.exception(10) for f in futures]
        release.set()
        assert held.result(10) == "hold"
    assert sorted(batches[1]) == [0, 1, 2, 3]  # one shared batch: its leader waited for company
    assert all(isinstance(e, ValueError) for e in errors)
    assert batcher.submit(7) == 7


def test_a_waiting_leader_runs_as_soon_as_the_other_batch_finishes():
    batches = []
    run, holding, release = _holding_runner(batches)
    batcher = MicroBatcher(run, max_batch=4, max_wait=5.0)
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(batcher.submit, "hold")
        assert holding.wait(10)
        waiting = pool.submit(batcher.submit, "x")
        time.sleep(0.1)
        assert not waiting.done()  # another batch is running: it waits for company
        started = time.perf_counter()
        release.set()
        assert waiting.result(10) == "x" and held.result(10) == "hold"
    assert time.perf_counter() - started < 2.0  # not the full 5 s
    assert batches == [["hold"], ["x"]]


def test_invalid_sizes_are_clamped():
    batcher = MicroBatcher(lambda items: items, max_batch=0, max_wait=-1)
    assert (batcher.max_batch, batcher.max_wait) == (1, 0.0)
    with pytest.raises(TypeError):
        MicroBatcher()  # run_batch is required
