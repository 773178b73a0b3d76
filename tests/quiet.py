"""What a finished test may leave running: nothing that uses CPU.

A test that leaves a thread or a process busy (an engine thread stepping a request nobody waits for,
an actor still generating, a server spinning) slows every test after it, and on a 2-core machine a
single spinning thread halves the speed of the rest of the suite. `busy_after_test` measures the CPU
used by everything this pytest process started (its threads other than the main one, and every
descendant process: Ray's raylet and workers, vLLM engines, servers) over short windows, until one
window is quiet or `deadline_s` has passed; it returns the busiest threads of the last window when
none was quiet.

Polling for a quiet window, rather than measuring one, is what keeps this independent of the
machine's speed: threads that finish their work (OpenMP's spin-wait after a computation, an actor
winding down after `ray.kill`) are quiet within a second or two; a leak never is.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import psutil

WINDOW_S = 0.05  # one sample; /proc counts CPU in 10 ms ticks, so a spinning thread shows as ~1.0
QUIET_CORES = 0.5  # what the whole tree may use in a window and still count as idle (idle Ray + stack: ~0.15)
DEADLINE_S = 30.0  # how long a finished test's threads get to wind down before they count as left behind


@dataclass(frozen=True)
class BusyThread:
    pid: int
    tid: int
    name: str  # the process's name (Ray sets "ray::Generator", ...) and the thread's, where known
    cores: float  # CPU seconds per second over the window


def _cpu_times() -> dict[tuple[int, int], tuple[float, str]]:
    """(pid, tid) -> (CPU seconds so far, name) for every thread of this process but the calling one,
    and every thread of every descendant process."""
    me = psutil.Process()
    own = threading.get_native_id()
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    times: dict[tuple[int, int], tuple[float, str]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            pname = proc.name()
            for t in proc.threads():
                if proc.pid == me.pid and t.id == own:
                    continue
                label = f"{pname}/{names[t.id]}" if proc.pid == me.pid and t.id in names else pname
                times[(proc.pid, t.id)] = (t.user_time + t.system_time, label)
        except psutil.Error:  # it ended meanwhile: it uses nothing now
            continue
    return times


def busy_threads(window_s: float = WINDOW_S) -> list[BusyThread]:
    """The threads that used CPU during one window of `window_s`, busiest first."""
    before = _cpu_times()
    time.sleep(window_s)
    after = _cpu_times()
    rows = [BusyThread(key[0], key[1], name, (cpu - before[key][0]) / window_s)
            for key, (cpu, name) in after.items() if key in before and cpu > before[key][0]]
    return sorted(rows, key=lambda r: -r.cores)


def busy_after_test(deadline_s: float = DEADLINE_S, quiet_cores: float = QUIET_CORES) -> list[BusyThread]:
    """[] as soon as one window uses less than `quiet_cores` in all; else the last window's threads."""
    end = time.monotonic() + deadline_s
    while True:
        rows = busy_threads()
        if sum(r.cores for r in rows) < quiet_cores:
            return []
        if time.monotonic() > end:
            return rows


def describe(rows: list[BusyThread], top: int = 6) -> str:
    shown = ", ".join(f"{r.name} (pid {r.pid}, thread {r.tid}): {r.cores:.2f} cores" for r in rows[:top])
    return f"{sum(r.cores for r in rows):.2f} cores in use by {shown}"


def enabled() -> bool:
    """RLHF_QUIET_CHECK=0 turns the check off (e.g. to profile a test with its leftovers)."""
    return os.environ.get("RLHF_QUIET_CHECK", "1") != "0"
