"""A sandboxed `python` code tool: a snippet runs in a process of its own, under limits.

`run_python(code, limits) -> SandboxResult` starts a fresh interpreter (`python -I -B -u`) in a new
session (its own process group) in a fresh temporary directory, hands it the code on stdin, and
returns a named outcome: "ok", "error" (the snippet raised or exited non-zero), "timeout" (the
wall-clock limit; the whole process group is killed), "cpu_limit" (RLIMIT_CPU: SIGXCPU),
"memory_limit" (RLIMIT_AS: the snippet's MemoryError), "killed" (another signal) or
"sandbox_error" (the sandbox itself could not be set up). Output is read as it comes and cut at
`max_output_bytes` per stream (the rest is drained and dropped, so a snippet that prints megabytes
neither blocks nor fills memory). Afterwards the process group is killed whatever happened and the
directory is removed. The caller's process is never touched: every limit is set inside the child.

What is enforced, and how:
- Wall clock: the caller kills the process group with SIGKILL at `wall_s`. With a PID namespace
  (below) the snippet runs as the namespace's init, and the kernel kills every process in the
  namespace when it dies, including ones that left the process group (setsid).
- CPU time, memory, file size, open files: RLIMIT_CPU (soft `cpu_s`, SIGKILL one second later),
  RLIMIT_AS (`memory_mb`, per process), RLIMIT_FSIZE (`max_file_bytes`), RLIMIT_NOFILE.
- Processes: RLIMIT_NPROC (`max_processes`) counts the processes of the real uid and is ignored for
  root, so it holds only where the snippet runs as another user (below); elsewhere a fork bomb
  is stopped by the wall-clock kill of its group alone.
- Network: where the OS permits (root, or unprivileged user namespaces), the snippet runs in a new
  network namespace: no interface but a down loopback, so nothing can connect anywhere. Otherwise
  (`SandboxResult.network == "refused"`) a Python audit hook refuses to create any socket other
  than AF_UNIX: a guard against ordinary library calls, not against ctypes or a subprocess.
- Files: the working directory, HOME and TMPDIR are the fresh directory; the environment is
  scrubbed. When the caller is root, the snippet runs as a fresh unprivileged uid that owns only
  that directory (keeping CAP_DAC_READ_SEARCH, so it can still read the interpreter and
  libraries, and with no_new_privs), so the kernel refuses writes to anything not world-writable.
  Everywhere, an audit hook refuses opening files for writing and creating, removing, renaming or
  changing files outside the directory (besides /dev/null); like the socket hook it guards
  library calls, not ctypes or subprocesses. World-writable places (/tmp, /dev/shm) are therefore
  protected by the hook alone, and AF_UNIX sockets are not blocked.
- Not enforced: reading files (the snippet can read what its user can), disk use inside the
  directory beyond max_file_bytes per file, CPU shares (a snippet uses up to a core per process).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from rollout.tools import Tool, tool_from_function

OUTCOMES = ("ok", "error", "timeout", "cpu_limit", "memory_limit", "killed", "sandbox_error")
_MEMORY_EXIT = 86  # the launcher's exit code for a snippet that ran out of memory
_SETUP_EXIT = 87  # ... and for a sandbox that could not be set up


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0  # wall-clock limit of the whole run
    cpu_s: int = 5  # CPU seconds per process (RLIMIT_CPU)
    memory_mb: int = 512  # address space per process (RLIMIT_AS)
    max_processes: int = 16  # RLIMIT_NPROC, where it holds (see the module docstring)
    max_file_bytes: int = 16 << 20  # largest file the snippet may write (RLIMIT_FSIZE)
    max_output_bytes: int = 8192  # kept of stdout and of stderr, each
    namespaces: bool = True  # try new network and PID namespaces (False: the fallbacks alone, for tests)
    drop_privileges: bool = True  # as root, run the snippet as a fresh unprivileged uid


@dataclass(frozen=True)
class SandboxResult:
    outcome: str  # one of OUTCOMES
    stdout: str
    stderr: str
    returncode: int | None  # the interpreter's (negative: killed by that signal); None when killed on timeout
    seconds: float
    output_truncated: bool  # stdout or stderr was cut at max_output_bytes
    network: str  # "namespace" (no network at all) or "refused" (the socket audit hook)
    pid_namespace: bool
    uid: int | None  # the uid the snippet ran as, when privileges were dropped


# Runs in the child: `python -I -B -u -c _LAUNCHER <json config>`, the snippet on stdin, fd `status_fd`
# a pipe for one JSON line saying which isolation took (and, under a PID namespace, the snippet's wait
# status, from the namespace's init); the snippet's own process closes it before the snippet runs.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
code = sys.stdin.read()
libc = ctypes.CDLL(None, use_errno=True)
NEWNET, NEWPID, NEWUSER = 0x40000000, 0x20000000, 0x10000000
status = {"network": "refused", "pid_namespace": False}
try:
    if cfg["namespaces"]:
        for flags in (NEWNET | NEWPID, NEWNET, NEWUSER | NEWNET | NEWPID, NEWUSER | NEWNET):
            if libc.unshare(flags) == 0:
                status["network"] = "namespace"
                status["pid_namespace"] = bool(flags & NEWPID)
                break
    if status["pid_namespace"]:
        # The next child is the namespace's init: when it dies, the kernel kills all in the namespace. It runs
        # the snippet in a child of its own (an init ignores signals it has no handler for, SIGXCPU included),
        # reaps orphans, and reports the snippet's wait status on the status pipe.
        if os.fork():
            os.close(cfg["status_fd"])
            _, st = os.waitpid(-1, 0)
            os._exit(0)
        snippet = os.fork()
        if snippet:
            os.write(cfg["status_fd"], (json.dumps(status) + "\n").encode())
            while True:
                pid, st = os.waitpid(-1, 0)
                if pid == snippet:
                    break
            os.write(cfg["status_fd"], (json.dumps({"wait_status": st}) + "\n").encode())
            os._exit(0)
    for limit, value in ((resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
                         (resource.RLIMIT_AS, (cfg["memory_bytes"],) * 2),
                         (resource.RLIMIT_FSIZE, (cfg["max_file_bytes"],) * 2),
                         (resource.RLIMIT_NOFILE, (256, 256)), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_NPROC, (cfg["max_processes"],) * 2)):
        resource.setrlimit(limit, value)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary gains privileges
    uid = cfg["uid"]
    if uid is not None:
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS across the uid change
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        data = (Data * 2)()
        data[0].effective = data[0].permitted = 1 << 2  # CAP_DAC_READ_SEARCH: read the interpreter, nothing more
        if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    if not status["pid_namespace"]:
        os.write(cfg["status_fd"], (json.dumps(status) + "\n").encode())
    os.close(cfg["status_fd"])
except BaseException as e:
    sys.stderr.write(f"sandbox setup failed: {type(e).__name__}: {e}\n")
    os._exit(87)

root = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.replace": 2, "os.mkdir": 1, "os.rmdir": 1, "os.chmod": 1,
               "os.chown": 1, "os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.utime": 1, "os.mkfifo": 1,
               "os.mknod": 1, "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.move": 2}
import socket as _socket_module
ALLOWED_FAMILIES = {int(_socket_module.AF_UNIX)}

def inside(path):
    if isinstance(path, int):
        return True
    p = os.path.realpath(os.fsdecode(path))
    return p == root or p.startswith(root + os.sep) or p == "/dev/null"

def guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and path is not None and not inside(path):
            raise PermissionError(f"the sandbox refuses writing outside its directory: {path}")
    elif event in PATH_EVENTS:
        for path in args[: PATH_EVENTS[event]]:
            if path is not None and not inside(path):
                raise PermissionError(f"the sandbox refuses changing files outside its directory: {path}")
    elif event == "socket.__new__" and status["network"] == "refused":
        family = args[1]
        if family not in ALLOWED_FAMILIES:
            raise PermissionError("the sandbox has no network")

sys.addaudithook(guard)
del _socket_module
glob = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(code, "<snippet>", "exec"), glob)
except SystemExit:
    raise
except MemoryError:
    os.write(2, b"MemoryError: the snippet ran out of its memory limit\n")
    os._exit(86)
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
sys.stderr.flush()
"""


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Runs `code` in the sandbox and returns what came of it (never raises for what the code does)."""
    limits = limits or SandboxLimits()
    began = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="rlhf-sandbox-")
    uid = None
    if limits.drop_privileges and os.geteuid() == 0:
        uid = random.randrange(1 << 30, 1 << 31)  # a fresh uid: RLIMIT_NPROC counts this snippet's processes alone
        os.chown(workdir, uid, uid)
    status_r, status_w = os.pipe()
    cfg = {"cpu_s": int(limits.cpu_s), "memory_bytes": int(limits.memory_mb) << 20,
           "max_file_bytes": int(limits.max_file_bytes), "max_processes": int(limits.max_processes),
           "namespaces": limits.namespaces, "uid": uid, "status_fd": status_w}
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1"}
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-u", "-c", _LAUNCHER, json.dumps(cfg)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                                env=env, start_new_session=True, pass_fds=(status_w,))
        os.close(status_w)
        status_w = -1
        out, err = _Capped(proc.stdout, limits.max_output_bytes), _Capped(proc.stderr, limits.max_output_bytes)
        status = _Capped(os.fdopen(status_r, "rb"), 4096)
        status_r = -1
        try:
            proc.stdin.write(code.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # leftovers of a finished snippet too (a background child holding the pipes)
        proc.wait()
        for reader in (out, err, status):
            reader.join(timeout=2.0)
        isolation = _status(status.text())
        stderr = err.text()
        rc = None if timed_out else proc.returncode
        if not timed_out and "wait_status" in isolation:  # the snippet ran under a namespace's init
            st = isolation["wait_status"]
            rc = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
        return SandboxResult(_outcome(rc, timed_out, stderr), out.text(), stderr, rc, time.monotonic() - began,
                             out.truncated or err.truncated, isolation.get("network", "refused"),
                             bool(isolation.get("pid_namespace")), uid if rc != _SETUP_EXIT else None)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


class _Capped:
    """Reads a stream to its end on a daemon thread, keeping the first `cap` bytes."""

    def __init__(self, stream, cap: int):
        self.cap, self.kept, self.seen = cap, bytearray(), 0
        self._stream = stream
        self._thread = threading.Thread(target=self._read, name="sandbox-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._stream:
            while chunk := self._stream.read1(1 << 16):
                self.seen += len(chunk)
                room = self.cap - len(self.kept)
                if room > 0:
                    self.kept += chunk[:room]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def truncated(self) -> bool:
        return self.seen > len(self.kept)

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(text: str) -> dict:
    merged: dict = {}
    for line in text.splitlines():
        try:
            merged.update(json.loads(line))
        except json.JSONDecodeError:
            continue
    return merged


def _outcome(rc: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "ok"
    if rc == -signal.SIGXCPU:
        return "cpu_limit"
    if rc == _MEMORY_EXIT and "MemoryError: the snippet ran out of its memory limit" in stderr:
        return "memory_limit"
    if rc == _SETUP_EXIT and stderr.startswith("sandbox setup failed"):
        return "sandbox_error"
    if rc is not None and rc < 0:
        return "killed"
    return "error"


def python_tool(limits: SandboxLimits | None = None) -> Tool:
    """The sandbox as a tool named `python` for rollout.tools.ToolBox (give the ToolBox a timeout_s above
    limits.wall_s, so the sandbox's own limit is the one that answers)."""
    limits = limits or SandboxLimits()

    def python(code: str) -> str:
        """Runs a Python snippet in a sandbox and returns what it printed.

        Args:
            code: the Python source to run; print what you want to see
        """
        r = run_python(code, limits)
        parts = [r.stdout] if r.stdout else []
        if r.stderr:
            parts.append(f"[stderr]\n{r.stderr}")
        notes = {"timeout": f"[stopped: it ran past the {limits.wall_s:g} s wall-clock limit]",
                 "cpu_limit": f"[stopped: it used its {limits.cpu_s} s of CPU time]",
                 "memory_limit": f"[stopped: it ran out of its {limits.memory_mb} MB of memory]",
                 "killed": f"[stopped by signal {-(r.returncode or 0)}]",
                 "sandbox_error": "[the sandbox could not start; this is not the code's fault]"}
        if r.outcome in notes:
            parts.append(notes[r.outcome])
        if r.output_truncated:
            parts.append(f"[output cut at {limits.max_output_bytes} bytes per stream]")
        return "\n".join(parts) if parts else "[no output]"

    return tool_from_function(python)
