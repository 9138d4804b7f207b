"""The decode memory budget: a bound, a short wait for room, and at most one budget's worth waiting."""

from __future__ import annotations

import threading
import time

import pytest

from imageclf.engine.budget import BudgetBusyError, BudgetExceededError, MemoryBudget


def _hold(budget: MemoryBudget, nbytes: int, release: threading.Event, entered: threading.Event) -> None:
    with budget.reserve(nbytes):
        entered.set()
        release.wait(30)


def test_one_budget_may_wait_and_more_is_refused_at_once():
    budget = MemoryBudget(100, wait_seconds=30)
    release, held, waited = threading.Event(), threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(budget, 80, release, held))
    holder.start()
    assert held.wait(10)
    waiter = threading.Thread(target=_hold, args=(budget, 60, release, waited))
    waiter.start()  # does not fit now, fits once the holder is done: it waits
    deadline = time.monotonic() + 10
    while budget._waiting != 60 and time.monotonic() < deadline:  # noqa: SLF001 - the state under test
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(BudgetBusyError, match="others already wait"):
        with budget.reserve(50):  # 60 waiting + 50 > 100: would not fit in the next round either
            pass
    assert time.monotonic() - started < 5  # at once, not after the 30 s wait
    with budget.reserve(20):  # fits now beside the holder: no wait at all
        pass
    release.set()
    holder.join(10)
    assert waited.wait(10)  # the waiter got its room when the holder left
    waiter.join(40)
    assert budget.used == 0


def test_a_request_over_the_whole_budget_is_refused_and_a_full_one_times_out():
    budget = MemoryBudget(100, wait_seconds=0.2)
    with pytest.raises(BudgetExceededError):
        with budget.reserve(101):
            pass
    with budget.reserve(100):
        with pytest.raises(BudgetBusyError, match="memory budget allows$"):
            with budget.reserve(1):
                pass
    assert budget.used == 0
