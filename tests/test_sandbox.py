"""The sandboxed python tool: snippets that loop forever, allocate without bound, fork, open sockets, write
outside their directory and print megabytes, each with its named outcome, and the calling process unaffected.
Limits are short (1-4 s) so the file runs in well under a minute on 2 cores."""

from __future__ import annotations

import os
import resource
import socket
import time
import uuid

import psutil
import pytest

from rollout.sandbox import SandboxLimits, python_tool, run_python
from rollout.tools import ToolBox

FAST = SandboxLimits(wall_s=2.0, cpu_s=1, memory_mb=256, max_processes=16, max_output_bytes=1000)


def live_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def no_children_left(before: set[int], deadline_s: float = 3.0) -> bool:
    """No process the run started is alive (others, e.g. a server a fixture of another test started, may be)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not live_children() - before:
            return True
        time.sleep(0.05)
    return False


def test_a_snippet_runs_in_a_fresh_directory_that_is_removed_after():
    r = run_python("import os\nopen('notes.txt', 'w').write('kept here')\n"
                   "print(os.getcwd()); print(os.environ['HOME']); print(open('notes.txt').read())", FAST)
    assert r.outcome == "ok" and r.returncode == 0 and r.stderr == ""
    cwd, home, text = r.stdout.splitlines()
    assert cwd == home and os.path.basename(cwd).startswith("rlhf-sandbox-") and text == "kept here"
    assert not os.path.exists(cwd)


def test_an_exception_is_an_error_with_its_traceback():
    r = run_python("def f():\n    raise ValueError('no such thing')\nf()", FAST)
    assert r.outcome == "error" and r.returncode == 1 and "ValueError: no such thing" in r.stderr
    assert run_python("import sys; sys.exit(3)", FAST).returncode == 3


def test_a_loop_forever_hits_the_cpu_limit():
    r = run_python("while True:\n    pass", SandboxLimits(wall_s=6.0, cpu_s=1))
    assert r.outcome == "cpu_limit" and r.seconds < 5.0


def test_a_sleep_forever_hits_the_wall_clock_limit():
    before = live_children()
    r = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)", SandboxLimits(wall_s=1.0))
    assert r.outcome == "timeout" and r.returncode is None and r.seconds < 2.5
    assert r.stdout == "started\n"  # output written before the kill is kept
    assert no_children_left(before)


def test_allocating_without_bound_hits_the_memory_limit():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))", FAST)
    assert r.outcome == "memory_limit" and "memory limit" in r.stderr


def test_forks_are_limited_and_every_process_is_killed():
    code = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n"
            "            time.sleep(60)\n            os._exit(0)\n        n += 1\n    except OSError as e:\n"
            "        print('refused after', n, type(e).__name__, flush=True)\n        break\ntime.sleep(60)")
    before = live_children()
    r = run_python(code, FAST)
    assert r.outcome == "timeout"
    if r.uid is not None:  # RLIMIT_NPROC holds for a non-root uid only
        assert r.stdout.startswith("refused after ") and int(r.stdout.split()[2]) < FAST.max_processes
    assert no_children_left(before)


def test_a_fork_bomb_is_contained():
    probe = run_python("pass", FAST)
    if probe.uid is None and not probe.pid_namespace:
        pytest.skip("neither RLIMIT_NPROC (needs a uid to drop to) nor a PID namespace is available here")
    before = live_children()
    r = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", FAST)
    assert r.outcome == "timeout" and r.seconds < 4.0
    assert no_children_left(before)


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespace-if-allowed", "hook-only"])
def test_sockets_reach_nothing(namespaces):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('in')",
                       SandboxLimits(wall_s=3.0, namespaces=namespaces))
        assert r.outcome == "error" and r.stdout == ""
        if r.network == "namespace":
            assert "Network is unreachable" in r.stderr
        else:
            assert not namespaces or r.network == "refused"
            assert "the sandbox has no network" in r.stderr
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespace-if-allowed", "hook-only"])
def test_writing_outside_the_directory_is_refused(tmp_path, namespaces):
    targets = [tmp_path / "outside.txt", f"/tmp/rlhf-sandbox-escape-{uuid.uuid4().hex}.txt"]
    for target in targets:
        r = run_python(f"open({str(target)!r}, 'w').write('escaped')", SandboxLimits(wall_s=3.0, namespaces=namespaces))
        assert r.outcome == "error" and "PermissionError" in r.stderr, r.stderr
        assert not os.path.exists(target)
    (tmp_path / "kept.txt").write_text("mine")
    r = run_python(f"import os\nos.remove({str(tmp_path / 'kept.txt')!r})", SandboxLimits(wall_s=3.0))
    assert r.outcome == "error" and "PermissionError" in r.stderr and (tmp_path / "kept.txt").exists()


def test_megabytes_of_output_are_cut_and_do_not_stall_the_run():
    r = run_python("import sys\nfor _ in range(50):\n    print('x' * 100_000)\nprint('done', file=sys.stderr)", FAST)
    assert r.outcome == "ok" and r.output_truncated and r.seconds < 3.0
    assert r.stdout == "x" * FAST.max_output_bytes and r.stderr == "done\n"


def test_the_caller_is_unaffected():
    before = {k: resource.getrlimit(k) for k in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_NPROC,
                                                  resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE)}
    run_python("while True:\n    pass", SandboxLimits(wall_s=3.0, cpu_s=1))
    run_python("x = bytearray(10 ** 10)", FAST)
    assert {k: resource.getrlimit(k) for k in before} == before
    with socket.socket() as s:  # the caller still has its network
        s.bind(("127.0.0.1", 0))
    assert os.getcwd() and run_python("print(6 * 7)", FAST).stdout == "42\n"


def test_the_python_tool_runs_through_a_toolbox():
    box = ToolBox([python_tool(FAST)], timeout_s=5.0)
    assert box.schemas[0]["function"]["name"] == "python"
    calls = ('<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>'
             '<tool_call>{"name": "python", "arguments": {"code": "import time; time.sleep(60)"}}</tool_call>')
    ok, slow = box.run(calls).result(timeout=10)
    assert ok.error is None and ok.content == "42\n"
    assert slow.error is None and "[stopped: it ran past the 2 s wall-clock limit]" in slow.content
