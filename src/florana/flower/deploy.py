"""A Flower deployment on one machine: a `flower-superlink` and N `flower-supernode`s on 127.0.0.1, optionally
with TLS and SuperNode authentication, and `flwr run` against them. The same commands, with real addresses,
make a federation across machines (README: "Across machines").

Every process is started in its own process group and stopped by pid (the group: SuperNodes fork SuperExec
and ClientApp processes), so nothing outlives `Loopback.close()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from florana.config import RunConfig, load_config
from florana.errors import FloranaError
from florana.federation.engine import read_metrics
from florana.flower.wire import flower_run_config

BIN = Path(sys.executable).parent


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's commands: state under `flwr_home`, no dependency installation at run time, and
    this interpreter's bin folder first on PATH (Flower starts flower-superexec, flwr-serverapp and
    flwr-clientapp from PATH)."""
    return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has name=value (Linux /proc; elsewhere none are found)."""
    needle, found = f"{name}={value}".encode(), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and int(entry.name) != os.getpid():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FloranaError(f"{name} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FloranaError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def stage_app(app_dir: Path, dest: Path) -> Path:
    """The files of the Flower app in `app_dir` that its FAB carries (pyproject.toml and what its `fab-include`
    patterns match), copied into a fresh `dest`. `flwr run` walks and resolves every file under the folder it
    builds from before it filters them: in a checkout with its .venv (~57,000 files) that took 8–11 s of CPU per run,
    from the copy a tenth of a second. An app without `fab-include`, or with a pattern pathlib cannot glob the same
    way (negation, a leading slash), is used as it is."""
    app_dir = Path(app_dir).resolve()
    project = tomllib.loads((app_dir / "pyproject.toml").read_text())
    patterns = project.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not patterns or any(p.startswith(("!", "/")) for p in patterns):
        return app_dir
    shutil.rmtree(dest, ignore_errors=True)
    for path in {app_dir / "pyproject.toml", *(f for p in patterns for f in app_dir.glob(p) if f.is_file())}:
        target = dest / path.relative_to(app_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


@dataclass
class Loopback:
    """SuperLink + SuperNodes on loopback. `certs` is a folder made by scripts/make_certs.sh (ca.crt, server.pem,
    server.key; node-<i> and node-<i>.pub for authentication) or None for a plain, insecure federation."""

    home: Path
    nodes: int
    certs: Path | None = None
    auth: bool = False
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self):
        self.home = Path(self.home).resolve()
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        if self.auth and self.certs is None:
            raise FloranaError("SuperNode authentication needs the keys in a certs folder (scripts/make_certs.sh)")
        self.env = flower_env(self.home / "flwr")

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.home / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.home, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        args = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.certs:
            args += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                     "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            args += ["--insecure"]
        if self.auth:
            args += ["--enable-supernode-auth"]
        wait_for_port(self.port, 60, self._start("superlink", args), "flower-superlink")
        self.write_connection()
        if self.auth:
            for i in range(self.nodes):
                self.flwr("supernode", "register", str(self.certs / f"node-{i}.pub"), "loopback")

    def start_node(self, i: int, *, node_config: str | None = None, key: Path | None = None,
                   name: str | None = None) -> subprocess.Popen:
        """SuperNode i holding partition i (or `node_config`), authenticated with node-<i> (or `key`)."""
        args = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                "--node-config", node_config or f"partition-id={i} num-partitions={self.nodes}",
                "--max-wait-time", "60"]
        args += ["--root-certificates", str(self.certs / "ca.crt")] if self.certs else ["--insecure"]
        if self.auth or key is not None:
            args += ["--auth-supernode-private-key", str(key or self.certs / f"node-{i}")]
        return self._start(name or f"supernode-{i}", args)

    def start(self) -> Loopback:
        self.start_superlink()
        for i in range(self.nodes):
            self.start_node(i)
        return self

    def write_connection(self) -> None:
        """The `loopback` connection in $FLWR_HOME/config.toml, which `flwr run . loopback` uses."""
        conn = {"address": f"127.0.0.1:{self.port}"}
        conn.update({"root-certificates": str(self.certs / "ca.crt")} if self.certs else {"insecure": True})
        path = Path(self.env["FLWR_HOME"]) / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps({"superlink": {"default": "loopback", "loopback": conn}}))

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.home, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise FloranaError(f"flwr {' '.join(args[:2])} failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr).strip()[-800:]}")
        return done

    def run(self, app_dir: Path, config: RunConfig, run_dir: Path, timeout: float = 1800, **runtime) -> Path:
        """`flwr run APP loopback --stream` (from APP's staged copy: stage_app) with `config` and the runtime keys
        (min-nodes, round-timeout, ...) as its run config; returns the run folder once the ServerApp has finished."""
        values = {**flower_run_config(config), "run-dir": str(Path(run_dir).resolve()),
                  **{k.replace("_", "-"): v for k, v in runtime.items()}}
        run_config = self.home / "run-config.toml"
        run_config.write_text(tomli_w.dumps(values))
        app = stage_app(app_dir, self.home / "app")
        done = self.flwr("run", str(app), "loopback", "--stream", "--run-config", str(run_config), timeout=timeout)
        # `flwr run` exits 0 whatever the ServerApp did: the run folder says whether the run finished
        run_dir = Path(run_dir)
        rounds = load_config(run_dir / "config.toml").rounds if (run_dir / "config.toml").is_file() else None
        finished = rounds is not None and (run_dir / "global_adapter").is_dir() and \
            [m["round"] for m in read_metrics(run_dir)][-1:] == [rounds]
        if not finished:
            log = (run_dir / "run.log").read_text().splitlines() if (run_dir / "run.log").is_file() else []
            errors = [line for line in log if " ERROR " in line] or (done.stdout + done.stderr).splitlines()[-5:]
            raise FloranaError(f"the federation in {run_dir} stopped before its last round: {errors[-1:]}")
        return run_dir

    def kill_node(self, i: int) -> None:
        """SIGKILL a SuperNode and everything it started, as a crashed machine would vanish."""
        self._signal(self.procs.pop(f"supernode-{i}"), signal.SIGKILL)

    def close(self) -> None:
        """Stop the processes we started (by process group), then any helper Flower detached from them, found
        by the FLWR_HOME they inherited."""
        for name in list(self.procs)[::-1]:
            self._signal(self.procs.pop(name), signal.SIGTERM)
        for pid in pids_with_env("FLWR_HOME", self.env["FLWR_HOME"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
