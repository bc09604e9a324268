"""Faults around the local services: a server that dies while `qabot up` waits for it, two `qabot up` at once
on a fresh home, a held lock, and the modes of what qabot writes under QABOT_HOME.

Real servers on free 127.0.0.1 ports under fresh temporary homes; every wait is bounded; only processes these
tests started are signalled, and all of them are stopped at the end, on failure too.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import time
from pathlib import Path

from servicekit import cleanup, env_for, leftovers, ports, qabot, spawn, wait_for


def _mlflow_leader(home: Path) -> int | None:
    """The MLflow server process this home's `qabot up` started (bash start.sh, then the server it execs)."""
    for pid, cmd in leftovers(home).items():
        try:
            if ("start.sh" in cmd or " server " in cmd) and "mlflow" in cmd and os.getpgid(pid) == pid:
                return pid
        except ProcessLookupError:
            continue
    return None


def test_up_reports_a_server_killed_while_starting_within_seconds(tmp_path):
    home = tmp_path / "home"
    env = env_for(home)
    m, p = ports(2)
    with cleanup(home, env):
        up = spawn(env, "up", "--no-worker", "--mlflow-port", str(m), "--prefect-port", str(p))
        try:
            pid = wait_for(lambda: _mlflow_leader(home), 60, "the MLflow server to start")
            log = home / "logs" / "mlflow.log"
            wait_for(lambda: "mlflow/start.sh: starting" in log.read_text(), 30, "start.sh's first line")
            os.kill(pid, signal.SIGKILL)  # dies while `up` waits for its health check
            t0 = time.monotonic()
            out, err = up.communicate(timeout=30)
            took = time.monotonic() - t0
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
                up.communicate(timeout=30)
        print(f"\nkilled MLflow server reported after {took:.2f} s")
        assert took < 10, took
        assert up.returncode == 1
        lines = err.strip().splitlines()
        assert lines[0] == (
            f"qabot: error: MLflow server was killed by signal 9 while starting; last lines of {home}/logs/mlflow.log:"
        ), err
        assert len(lines) > 1 and all(line.startswith("  | ") for line in lines[1:]), err
        assert "mlflow/start.sh: starting the MLflow server on 127.0.0.1" in err
        assert "Traceback" not in lines[0]
        assert not (home / "logs" / "prefect.log").exists(), "nothing more is started after a failure"
        assert leftovers(home) == {}, "the dead server's other processes are gone too"


def test_up_reports_a_server_that_exits_by_itself_with_its_log(tmp_path):
    home = tmp_path / "home"
    env = env_for(home, MLFLOW_BACKEND_URI="bogus://nowhere")  # read by mlflow/start.sh
    m, p = ports(2)
    with cleanup(home, env):
        t0 = time.monotonic()
        proc = qabot(env, "up", "--no-worker", "--mlflow-port", str(m), "--prefect-port", str(p), timeout=120)
        took = time.monotonic() - t0
        print(f"\n`qabot up` with a bad MLflow backend failed after {took:.1f} s (server start included)")
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert lines[0].startswith(
            "qabot: error: MLflow server exited with code 1 while starting; last lines of"
        )
        assert "bogus://nowhere" in lines[-1], proc.stderr
        assert leftovers(home) == {}


def test_a_held_lock_makes_up_wait_then_give_up_starting_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    env = env_for(home, QABOT_LOCK_TIMEOUT="2")
    m, p = ports(2)
    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running `qabot up`/`down` would
        with cleanup(home, env_for(home, QABOT_LOCK_TIMEOUT="0")):
            t0 = time.monotonic()
            proc = qabot(env, "up", "--mlflow-port", str(m), "--prefect-port", str(p), timeout=60)
            took = time.monotonic() - t0
            assert proc.returncode == 1, (proc.stdout, proc.stderr)
            assert proc.stderr.strip().splitlines()[-1] == (
                f"qabot: error: another `qabot up`/`down` has held {home}/lock for over 2 s"
            ), proc.stderr
            assert took < 30 and not leftovers(home) and not (home / "logs").exists()
    finally:
        os.close(fd)


# --- two `qabot up` at once on a fresh home ---------------------------------------------------------------------


def _servers(home: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {"mlflow": [], "prefect": []}
    for pid, cmd in leftovers(home).items():
        if os.getpgid(pid) != pid:
            continue  # a server's own workers
        if "mlflow" in cmd and " server " in cmd:
            found["mlflow"].append(pid)
        elif "flows.prefect_server" in cmd or "prefect server start" in cmd:
            found["prefect"].append(pid)
    return found


def test_two_concurrent_ups_end_cleanly_with_one_of_each_server(stack):
    """The session's services were started by two `qabot up` at once on a fresh home (conftest `stack`)."""
    print(f"\ntwo concurrent `qabot up` ended after {[r[3] for r in stack['results']]} s")
    for rc, out, err, _ in stack["results"]:
        assert rc == 0, err[-3000:]
        m, p = stack["mlflow"], stack["prefect"]
        assert f"MLflow:  http://127.0.0.1:{m}" in out and f"Prefect: http://127.0.0.1:{p}" in out, out
    servers = _servers(stack["home"])
    assert len(servers["mlflow"]) == 1 and len(servers["prefect"]) == 1, leftovers(stack["home"])
    state = json.loads((stack["home"] / "services.json").read_text())
    assert {k: state["pids"][k] for k in ("mlflow", "prefect")} == {
        "mlflow": servers["mlflow"][0],
        "prefect": servers["prefect"][0],
    }
    proc = qabot(stack["env"], "status", timeout=60)
    assert proc.stdout.count(" running ") == 3 and "answers" in proc.stdout, proc.stdout


def test_files_under_home_are_readable_only_by_their_owner(stack):
    home = stack["home"]
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for d in (home, home / "logs", home / "mlflow", home / "mlflow" / "artifacts", home / "prefect"):
        assert mode(d) == 0o700, (d, oct(mode(d)))
    files = [home / "services.json", home / "lock", *sorted((home / "logs").iterdir())]
    expected = {"mlflow.log", "prefect.log"}
    if stack["postgres"] is None:  # on SQLite the databases are files under the home (else in PostgreSQL)
        files += [home / "mlflow" / "mlflow.db", home / "prefect" / "prefect.db"]
        expected |= {"mlflow.db", "prefect.db"}
    assert {f.name for f in files} >= expected
    for f in files:
        assert mode(f) == 0o600, (f, oct(mode(f)))
