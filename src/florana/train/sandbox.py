"""Run untrusted programs (generated code + its tests), each in its own process, and say which ones passed.

What is enforced, in layers, for each program (Linux):
- its own process (`python -I -S`: isolated mode, standard library only), in a new session whose whole process
  group is killed when it ends or at the wall-clock timeout; never the florana process itself;
- kernel limits set in the child before the program runs: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU),
  size of any file it writes (RLIMIT_FSIZE), open files, no core dumps;
- its own network namespace (no interface but a down loopback) when the kernel allows it (root or user namespaces);
  where it does not, only the Python-level socket guard below stands;
- when florana runs as root and the interpreter's standard library is readable by others, the program runs as
  user `nobody` (and RLIMIT_NPROC then caps its processes), so it cannot raise its limits nor write what root owns;
- a fresh temporary folder as its working folder, HOME and TMPDIR, a minimal environment;
- Python-level guards: opening a file for writing, creating, removing, renaming or changing anything outside the
  working folder raises PermissionError; sockets, fork/exec/spawn/kill and subprocesses are refused; ctypes and
  resource cannot be imported;
- it passes only if it runs to its end and exits 0: the child prints a random token after the program returns, so
  a `sys.exit(0)` or `os._exit(0)` before the asserts is a failure.
The Python-level guards stop accidents and careless code (what a model writes), not a determined adversary: a
program can reach the kernel through channels they do not cover (the `posix` module's own functions, ...). The
kernel-level layers hold regardless; the strongest (network namespace, user nobody) depend on the host, as above.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The child: read its instructions from stdin, lock itself down, run the program, print the token.
CHILD = r'''
import json, os, resource, sys
cfg = json.loads(sys.stdin.read())
token, source, work = cfg["token"], cfg["source"], os.getcwd()
for limit, soft, hard in ((resource.RLIMIT_AS, cfg["memory"], cfg["memory"]),
                          (resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1),
                          (resource.RLIMIT_FSIZE, cfg["fsize"], cfg["fsize"]),
                          (resource.RLIMIT_NOFILE, 64, 64), (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(limit, (soft, hard))
try:  # a network namespace of its own: no route anywhere (needs privileges the host may not grant)
    import ctypes
    ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
except Exception:
    pass
def readable_by_others(path):
    parts = os.path.realpath(path).split(os.sep)
    dirs = [os.sep + os.path.join(*parts[1:i]) for i in range(2, len(parts) + 1)]
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and os.stat(path).st_mode & 0o004
if os.geteuid() == 0 and readable_by_others(os.path.dirname(os.__file__)):
    uid = gid = 65534  # nobody
    os.chown(work, uid, gid)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
import builtins, io, socket, _socket, subprocess, _posixsubprocess
def refuse(*args, **kwargs):
    raise PermissionError("not allowed in the florana sandbox")
def inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    real = os.path.realpath(os.fsdecode(path))  # relative to the working folder, wherever inside it that is
    return real == work or real.startswith(work + os.sep)
def paths_inside(fn, count):
    def guarded(*args, **kwargs):
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None or \
                kwargs.get("dst_dir_fd") is not None or not all(inside(p) for p in args[:count]):
            raise PermissionError("the florana sandbox refuses to change anything outside its folder")
        return fn(*args, **kwargs)
    return guarded
real_open, real_os_open, write = builtins.open, os.open, os.write
def guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not inside(file):
        raise PermissionError("the florana sandbox refuses to write outside its folder")
    return real_open(file, mode, *args, **kwargs)
def guarded_os_open(path, flags, *args, **kwargs):
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    if flags & writes and (kwargs.get("dir_fd") is not None or not inside(path)):
        raise PermissionError("the florana sandbox refuses to write outside its folder")
    return real_os_open(path, flags, *args, **kwargs)
class GuardedFileIO(io.FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError("the florana sandbox refuses to write outside its folder")
        super().__init__(file, mode, *args, **kwargs)
builtins.open = io.open = guarded_open
io.FileIO = sys.modules["_io"].FileIO = GuardedFileIO
os.open = guarded_os_open
for name, count in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("chmod", 1), ("chown", 1),
                    ("lchown", 1), ("truncate", 1), ("utime", 1), ("mkfifo", 1), ("mknod", 1), ("rename", 2),
                    ("replace", 2), ("link", 2), ("symlink", 2), ("chdir", 1), ("chroot", 1)):
    if hasattr(os, name):
        setattr(os, name, paths_inside(getattr(os, name), count))
for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setuid", "setgid", "putenv",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
             "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
    if hasattr(os, name):
        setattr(os, name, refuse)
subprocess.Popen = _posixsubprocess.fork_exec = refuse
socket.socket = _socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = refuse
for name in ("ctypes", "_ctypes", "resource"):
    sys.modules[name] = None
done = (lambda line: lambda: write(1, line))(("\n" + token + "\n").encode())  # the token kept out of reach
del cfg, token, name, count
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
done()
'''


@dataclass(frozen=True)
class Limits:
    """What one program may use: wall-clock seconds (CPU seconds are capped at the same), address space and the
    size of any file it writes in MiB, and the interpreter that runs it."""

    timeout_s: float = 5.0
    memory_mib: int = 1024
    file_mib: int = 16
    python: str = sys.executable


@dataclass(frozen=True)
class Outcome:
    """passed, or why not ('timeout', 'exit 1', 'signal 9', 'exit 0 before its end'), with the child's pid and
    the end of its stderr."""

    passed: bool
    reason: str
    pid: int
    seconds: float
    stderr: str


def _exited(pid: int) -> bool:
    """The child has exited, left unreaped (WNOWAIT) so that its pid, hence its process group, stays reserved."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _tail(path: str, size: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode("utf-8", "replace")


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` in a fresh process and folder under `limits`; it passes if it runs to its end and exits 0."""
    top = tempfile.mkdtemp(prefix="florana-sandbox-")
    work, out, err = (os.path.join(top, name) for name in ("work", "stdout", "stderr"))
    os.mkdir(work)
    token = secrets.token_hex(16)
    cfg = {"token": token, "source": source, "memory": limits.memory_mib * 2**20, "fsize": limits.file_mib * 2**20,
           "cpu": max(1, int(limits.timeout_s + 0.999))}
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    t0 = time.monotonic()
    try:
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen([limits.python, "-I", "-S", "-c", CHILD], stdin=subprocess.PIPE, stdout=fo,
                                    stderr=fe, cwd=work, env=env, start_new_session=True)
        try:
            try:
                proc.stdin.write(json.dumps(cfg).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            deadline, pause = t0 + limits.timeout_s, 0.002
            while not _exited(proc.pid) and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            timed_out = not _exited(proc.pid)
        finally:
            try:  # the leader is unreaped, so its group id cannot have been reused: kill all that is left of it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            code = proc.wait()
        seconds = time.monotonic() - t0
        stdout_tail, stderr_tail = _tail(out, 256), _tail(err)
        if timed_out:
            reason = "timeout"
        elif code < 0:
            reason = f"signal {-code}"
        elif code != 0:
            reason = f"exit {code}"
        elif token not in stdout_tail:
            reason = "exit 0 before its end"
        else:
            reason = "passed"
        return Outcome(reason == "passed", reason, proc.pid, seconds, stderr_tail[-1000:])
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int = 2) -> list[Outcome]:
    """Each source in its own sandboxed process, `workers` at a time; outcomes in the order of the sources."""
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources)))) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
