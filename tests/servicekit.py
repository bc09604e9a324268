"""Helpers for tests that start the real services: a fresh QABOT_HOME, free ports, bounded waits, cleanup.

Every process a test starts carries its own temporary QABOT_HOME in its environment, so `leftovers(home)` finds
exactly the processes that test started (the servers, their children, `qabot up` itself) and nothing else.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORTS = (5000, 4200)


def ports(n: int = 2) -> list[int]:
    """Free ports on 127.0.0.1, never the defaults a developer's own `qabot up` may hold."""
    from flows.services import free_port

    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p not in DEFAULT_PORTS and p not in out:
            out.append(p)
    return out


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "QABOT_"))}
    env.update({"QABOT_HOME": str(home), "PYTHONUNBUFFERED": "1", "QABOT_LOCK_TIMEOUT": "400", **extra})
    return env


def qabot(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`qabot ARGS` from this checkout; on timeout its whole process group is killed and the error re-raised."""
    proc = spawn(env, *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def spawn(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.communicate(timeout=30)


def leftovers(home: Path) -> dict[int, str]:
    """{pid: command line} of live processes whose environment names this (temporary, unique) home."""
    mark = f"QABOT_HOME={home}".encode()
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if mark not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def kill_leftovers(home: Path, timeout: float = 20) -> dict[int, str]:
    """SIGKILL what is left of the processes started for `home`; return what there was."""
    found = leftovers(home)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while leftovers(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@contextmanager
def cleanup(home: Path, env: dict):
    """On exit, even on failure: `qabot down`, then SIGKILL whatever this home's processes left behind."""
    try:
        yield
    finally:
        try:
            qabot(env, "down", timeout=90)
        finally:
            kill_leftovers(home)


def http(url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode(errors="replace")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- PostgreSQL -------------------------------------------------------------------------------------------------

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _as_postgres(cmd: list[str]) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: as root, its tools run as the `postgres` user."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@contextmanager
def postgres_cluster(databases: tuple[str, ...] = ("mlflow", "prefect")):
    """A PostgreSQL cluster of its own (Debian's server package: initdb, pg_ctl) on a free loopback port, with
    `databases`; yields {"url": "user@host:port", "sql": fn(db, query) -> text}, or None where the server
    package is not installed. Stopped and removed on exit."""
    if not PG_BIN:
        yield None
        return
    bindir = Path(PG_BIN[-1])
    root = Path(tempfile.mkdtemp(prefix="qabot-pg-"))  # outside pytest's own (root's, 0700) directories
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, (port,) = root / "data", ports(1)
    try:
        init = _as_postgres(
            [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "qabot", "-E", "UTF8"]
        )
        assert init.returncode == 0, init.stderr[-2000:]
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = _as_postgres(
            [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"]
        )
        assert start.returncode == 0, (start.stdout, start.stderr)
        conn = ["-h", "127.0.0.1", "-p", str(port), "-U", "qabot"]
        for db in databases:
            made = _as_postgres([str(bindir / "createdb"), *conn, db])
            assert made.returncode == 0, made.stderr

        def sql(db: str, query: str) -> str:
            out = _as_postgres([str(bindir / "psql"), *conn, "-d", db, "-tAc", query])
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()

        yield {"url": f"qabot@127.0.0.1:{port}", "sql": sql}
    finally:
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def postgres_env(pg: dict | None) -> dict[str, str]:
    """The settings `qabot up` starts its servers on PostgreSQL with (nothing without a cluster)."""
    if pg is None:
        return {}
    return {
        "MLFLOW_BACKEND_URI": f"postgresql://{pg['url']}/mlflow",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg['url']}/prefect",
    }
