"""The sandbox that scores generated code: what passes, and that hostile or broken programs fail and do nothing else."""

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from florana.train.sandbox import Limits, run_program, run_programs

FAST = Limits(timeout_s=1.5, memory_mib=256)
ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def session_members(sid: int) -> list[int]:
    """Processes (any left alive) whose session is `sid`: the sandbox's child leads one of its own."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after 'pid (comm)': state ppid pgrp session ...
            if int(fields[3]) == sid:
                found.append(int(entry.name))
    return found


def assert_gone(outcome):
    with pytest.raises(ProcessLookupError):
        os.kill(outcome.pid, 0)
    assert session_members(outcome.pid) == []


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    good, bad = run_programs([ADD + TESTS, ADD.replace("a + b", "a - b") + TESTS], FAST)
    assert good.passed and good.reason == "passed"
    assert not bad.passed and bad.reason == "exit 1" and "AssertionError" in bad.stderr
    assert_gone(good)
    assert_gone(bad)
    syntax = run_program("def add(a, b) return a\n" + TESTS, FAST)
    assert not syntax.passed and "SyntaxError" in syntax.stderr


def test_an_infinite_loop_is_a_timeout_and_leaves_nothing_behind():
    t0 = time.monotonic()
    out = run_program("while True:\n    pass\n", FAST)
    assert not out.passed and out.reason in ("timeout", "signal 9", "signal 24")
    assert time.monotonic() - t0 < FAST.timeout_s + 2
    assert_gone(out)
    sleeper = run_program("import time\ntime.sleep(60)\n", Limits(timeout_s=0.5))
    assert sleeper.reason == "timeout" and 0.5 <= sleeper.seconds < 2.5
    assert_gone(sleeper)


def test_a_huge_allocation_fails_inside_the_child():
    out = run_program("x = bytearray(8 * 2**30)\nassert len(x)\n", FAST)
    assert not out.passed and "MemoryError" in out.stderr
    grow = run_program("x = []\nwhile True:\n    x.append(' ' * 2**20)\n", FAST)
    assert not grow.passed
    assert_gone(out)
    assert_gone(grow)


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_exiting_zero_before_the_asserts_is_a_failure(exit_call):
    out = run_program(ADD.replace("a + b", "a * b") + exit_call + "\n" + TESTS, FAST)
    assert not out.passed and out.reason == "exit 0 before its end"
    assert_gone(out)


def test_printing_what_looks_like_success_is_not_success():
    out = run_program("print('passed')\nprint('0' * 32)\nimport os\nos._exit(0)\n", FAST)
    assert not out.passed


def test_writing_outside_its_folder_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = [f"open({str(target)!r}, 'w').write('x')",
                f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
                f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
                f"import os\nos.mkdir({str(tmp_path / 'made')!r})",
                f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w').write('x')",
                "open('../escaped.txt', 'w').write('x')",
                f"import io\nio.FileIO({str(target)!r}, 'w')", f"import _io\n_io.FileIO({str(target)!r}, 'w')"]
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    attempts += [f"import os\nos.remove({str(keep)!r})", f"import os\nos.rename({str(keep)!r}, 'stolen')",
                 f"open({str(keep)!r}, 'a').write('x')"]
    outcomes = run_programs(attempts, FAST, workers=2)
    for code, out in zip(attempts, outcomes):
        assert not out.passed, code
        assert "PermissionError" in out.stderr, (code, out.stderr)
        assert_gone(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"] and keep.read_text() == "mine"


def test_its_own_folder_is_writable_and_removed_afterwards():
    program = ("import os, tempfile\nopen('scratch.txt', 'w').write('hi')\nos.mkdir('sub')\n"
               "open('sub/x', 'w').write('y')\nassert open('scratch.txt').read() == 'hi'\n"
               "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('z')\nprint(os.getcwd())\n")
    out = run_program(program, FAST)
    assert out.passed, out.stderr


def test_no_network_no_processes():
    for code in ("import socket\nsocket.socket()", "import socket\nsocket.create_connection(('127.0.0.1', 9))",
                 "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                 "import os\nos.fork()", "import os\nos.kill(1, 0)"):
        out = run_program(code, FAST)
        assert not out.passed and "PermissionError" in out.stderr, code
        assert_gone(out)
    for code in ("import ctypes", "import resource"):
        assert "ImportError" in run_program(code, FAST).stderr or "ModuleNotFound" in run_program(code, FAST).stderr


def test_a_file_larger_than_the_limit_cannot_be_written():
    out = run_program("open('big', 'wb').write(b'x' * (32 * 2**20))\n", Limits(timeout_s=2, file_mib=1))
    assert not out.passed


def test_network_namespace_and_user_nobody_where_the_host_allows_them():
    """As root with an interpreter whose standard library others can read, the program runs as nobody in a
    network namespace of its own (no interface but loopback)."""
    system = shutil.which("python3", path="/usr/bin")
    if os.geteuid() != 0 or system is None or not sys.platform.startswith("linux"):
        pytest.skip("needs root and /usr/bin/python3 on Linux")
    lib = Path(os.path.realpath(system)).parent.parent / "lib" / Path(system).resolve().name
    if not lib.is_dir() or not all(os.stat(d).st_mode & 0o001 for d in [lib, *lib.parents]):
        pytest.skip(f"{lib} is not readable by others")
    import subprocess

    probe = "import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare(0x40000000) != 0)"
    if subprocess.run([system, "-I", "-c", probe]).returncode != 0:
        pytest.skip("this host does not grant a network namespace")
    program = ("import os\nassert os.getuid() == 65534, os.getuid()\n"
               "names = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n"
               "assert names == ['lo'], names\n")
    out = run_program(program, Limits(timeout_s=3, python=system))
    assert out.passed, out.stderr
