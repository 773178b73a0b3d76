"""The leftover check of conftest.py: a spinning thread is found and named; an idle one is not."""

from __future__ import annotations

import threading

from tests import quiet


def test_a_spinning_thread_is_named_and_a_stopped_one_is_not():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin, name="spinner", daemon=True)
    thread.start()
    try:
        left = quiet.busy_after_test(deadline_s=1.0)
        assert any(r.name.endswith("/spinner") and r.cores > 0.5 for r in left), quiet.describe(left)
        assert "spinner" in quiet.describe(left)
    finally:
        stop.set()
        thread.join()
    assert quiet.busy_after_test(deadline_s=10.0) == []
