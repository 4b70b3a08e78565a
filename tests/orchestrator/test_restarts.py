"""The local stack's restart policy (stack.Restarts): backoff, its reset, and giving up."""

from services.orchestrator.stack import Restarts


def test_the_delay_doubles_up_to_the_cap():
    r = Restarts(first_delay=0.5, max_delay=2.0, max_failures=100)
    assert [r.failed(now=i, uptime=1) for i in range(5)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_a_process_that_stayed_up_starts_the_backoff_over():
    r = Restarts(first_delay=0.5, stable_s=60, max_failures=100)
    r.failed(0, uptime=1), r.failed(1, uptime=1)
    assert r.failed(100, uptime=90) == 0.5


def test_it_gives_up_after_rapid_failures_only():
    r = Restarts(max_failures=3, window_s=60)
    assert r.failed(0, 1) is not None and r.failed(10, 1) is not None
    assert r.failed(20, 1) is None
    slow = Restarts(max_failures=3, window_s=60)
    assert all(slow.failed(t, 1) is not None for t in (0, 50, 100, 150))  # never 3 within a minute
