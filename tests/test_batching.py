"""Micro-batching with real threads: concurrent submissions share batches, errors reach everyone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imageclf.engine.batching import BatchFailedError, BatchTimeoutError, MicroBatcher


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
    assert all(isinstance(e, BatchFailedError) and isinstance(e.__cause__, ValueError) for e in errors)
    assert len({id(e) for e in errors}) == 4  # one exception object per thread, never one shared
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


def test_a_request_split_over_batches_never_exceeds_the_batch_size():
    sizes = []

    def run(items):
        sizes.append(len(items))
        return [item * 2 for item in items]
    batcher = MicroBatcher(run, max_batch=8, max_wait=0.0)
    assert batcher.submit_many(list(range(20))) == [i * 2 for i in range(20)]
    assert sizes == [8, 8, 4]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda n: batcher.submit_many(list(range(n))), range(1, 30)))
    assert results == [[i * 2 for i in range(n)] for n in range(1, 30)]
    assert max(sizes) <= 8 and batcher.stats["largest"] <= 8


def test_members_stop_waiting_for_a_hung_model_call():
    release = threading.Event()
    slow_running = threading.Event()

    def run(items):
        if "slow" in items:
            slow_running.set()
            release.wait(10)
        if "hang" in items:
            release.wait(10)
        return items
    batcher = MicroBatcher(run, max_batch=2, max_wait=5.0, timeout=0.3)
    with ThreadPoolExecutor(3) as pool:
        slow = pool.submit(batcher.submit, "slow")
        assert slow_running.wait(10)
        leader = pool.submit(batcher.submit, "hang")  # another batch runs: waits for company
        time.sleep(0.1)
        started = time.perf_counter()
        with pytest.raises(BatchTimeoutError, match="did not answer within 0.3 s"):
            batcher.submit("member")  # joins the hanging batch as its second member
        assert time.perf_counter() - started < 2.0
        release.set()
        assert slow.result(10) == "slow" and leader.result(10) == "hang"


def test_a_model_with_one_call_at_a_time_gets_full_batches_not_a_queue_of_small_ones():
    """max_running=1 (a LiteRT model with one interpreter): while a call runs, arrivals wait in
    the one open batch instead of each opening a batch of its own that queues for the model."""
    batches, running, most = [], [0], [0]
    lock = threading.Lock()

    def run(items):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            batches.append(len(items))
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return items
    batcher = MicroBatcher(run, max_batch=8, max_wait=0.001, max_running=1)
    with ThreadPoolExecutor(16) as pool:
        first = pool.submit(batcher.submit, -1)
        time.sleep(0.01)  # the first call is running: 16 more arrive while it does
        results = list(pool.map(batcher.submit, range(16)))
    assert first.result(10) == -1 and results == list(range(16))
    assert most[0] == 1
    assert batches[0] == 1 and batches[1:] == [8, 8]  # without the bound: 8 calls at once


def test_a_leader_waiting_for_a_busy_model_times_out():
    release = threading.Event()

    def run(items):
        release.wait(10)
        return items
    batcher = MicroBatcher(run, max_batch=4, max_wait=0.0, timeout=0.3, max_running=1)
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(batcher.submit, "hold")
        time.sleep(0.05)
        with pytest.raises(BatchTimeoutError):
            batcher.submit("late")
        release.set()
        assert held.result(10) == "hold"
    assert batcher.submit("again") == "again"  # the failed batch left nothing behind
