"""Exposure of the local services and the identity of the processes `qabot down` / `status` act on.

The Prefect server refuses foreign Host headers, cross-origin browsers and state changes without a CSRF
token; the worker, `prefect deploy` and `run_deployment` still work through it; MLflow refuses a forged Host;
no telemetry; basic auth when asked for. `qabot down` never signals a process that merely has a recorded pid,
and `qabot status` calls a record from another process (or another boot) stale.

The servers are the session's (conftest `stack`: free 127.0.0.1 ports, a fresh QABOT_HOME); the runs of
tests/test_e2e.py go through the same servers with CSRF protection on, which shows Prefect's own clients (the
worker, `prefect deploy`, `run_deployment`) still work. Everything started is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servicekit import cleanup, env_for, http, kill_leftovers, ports, qabot, wait_for

from flows import services

EVIL = "http://evil.example"


# --- Prefect: Host, CORS, CSRF ---------------------------------------------------------------------------------


def test_prefect_refuses_a_foreign_host_header(stack):
    base = stack["state"]["prefect_url"]
    assert http(f"{base}/api/health")[0] == 200
    for method, path, data in (("GET", "/api/health", None), ("POST", "/api/deployments/filter", b"{}")):
        code, _, body = http(
            f"{base}{path}", method, {"Host": "evil.example", "Content-Type": "application/json"}, data
        )
        assert code == 400, (method, path, code, body)  # a DNS-rebinding page never gets an answer
    code, _, _ = http(f"{base}/api/health", headers={"Host": f"evil.example:{stack['prefect']}"})
    assert code == 400


def test_prefect_cors_allows_only_its_own_ui(stack):
    base = stack["state"]["prefect_url"]
    for method in ("POST", "PATCH", "DELETE"):
        code, headers, _ = http(
            f"{base}/api/deployments/00000000-0000-0000-0000-000000000000",
            "OPTIONS",
            {"Origin": EVIL, "Access-Control-Request-Method": method},
        )
        assert code != 200 and headers.get("access-control-allow-origin") not in ("*", EVIL), (
            method,
            code,
            headers,
        )
    own = f"http://127.0.0.1:{stack['prefect']}"
    code, headers, _ = http(
        f"{base}/api/deployments/filter", "OPTIONS", {"Origin": own, "Access-Control-Request-Method": "POST"}
    )
    assert code == 200 and headers.get("access-control-allow-origin") == own


def test_prefect_state_changes_need_a_csrf_token(stack):
    base = stack["state"]["prefect_url"]
    hdr = {"Content-Type": "application/json"}
    body = json.dumps({"name": "from-a-web-page", "type": "process"}).encode()
    code, _, text = http(f"{base}/api/work_pools/", "POST", hdr, body)
    assert code == 403 and "CSRF" in text, (code, text)
    code, _, text = http(f"{base}/api/deployments/filter", "POST", hdr, b"{}")
    assert code == 403, (code, text)
    # a client that fetches a token first (what Prefect's own client does) is served
    pools = services.prefect_api("POST", "/work_pools/filter", {}, home=stack["home"])
    assert services.WORK_POOL in {p["name"] for p in pools}
    assert "from-a-web-page" not in {p["name"] for p in pools}


# --- MLflow, telemetry ------------------------------------------------------------------------------------------


def test_mlflow_refuses_a_forged_host_header(stack):
    base = stack["state"]["mlflow_url"]
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert http(base + path)[0] == 200
    code, _, body = http(base + path, headers={"Host": "evil.example"})
    assert code == 403 and "Invalid Host header" in body, (code, body)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)


def test_servers_worker_and_clients_run_without_telemetry(stack):
    procs = stack["state"]["procs"]
    for name in ("mlflow", "prefect", "worker"):
        env = _environ(procs[name]["pid"])
        assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true", name
        assert env.get("DO_NOT_TRACK") == "true", name
        assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", name
    pe = _environ(procs["prefect"]["pid"])
    assert pe["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert pe["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == (
        f"http://127.0.0.1:{stack['prefect']},http://localhost:{stack['prefect']}"
    )
    client = services.service_env(stack["home"])
    assert client["MLFLOW_DISABLE_TELEMETRY"] == "true" and client["DO_NOT_TRACK"] == "true"
    assert client["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_status_shows_servers_pool_and_worker(stack):
    import time

    deadline = time.monotonic() + 60  # a worker just started registers with the pool within seconds
    while True:
        proc = qabot(stack["env"], "status", timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
        if lines.get("pool", ":").split(":")[1].strip().startswith("READY") or time.monotonic() > deadline:
            break
        time.sleep(2)
    for name in ("mlflow", "prefect", "worker"):
        assert " running " in lines[name] and f"pid {stack['state']['procs'][name]['pid']}" in lines[name], (
            proc.stdout
        )
    assert "answers" in lines["mlflow"] and "answers" in lines["prefect"]
    assert lines["pool"].startswith(f"pool     {services.WORK_POOL}: READY, 1 of 1 worker(s) online"), (
        proc.stdout
    )


# --- basic auth -------------------------------------------------------------------------------------------------


def test_bind_beyond_loopback_requires_auth_and_says_how(tmp_path, monkeypatch):
    """Settings only: no server is bound beyond loopback in a test."""
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    monkeypatch.delenv("QABOT_PREFECT_AUTH", raising=False)
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    for host, loopback in (
        ("127.0.0.1", True),
        ("localhost", True),
        ("192.0.2.10", False),
        ("0.0.0.0", False),
    ):
        monkeypatch.setenv("QABOT_BIND_HOST", host)
        assert services.bind_host() == (host, loopback)
    assert services._prefect_auth(home, required=False) is None
    auth = services._prefect_auth(home, required=True)
    user, _, password = auth.partition(":")
    assert user == "qabot" and len(password) >= 24
    f = home / "prefect-auth"
    assert f.read_text().strip() == auth and stat.S_IMODE(f.stat().st_mode) == 0o600
    settings, url = services._prefect_server_env("192.0.2.10", False, 4321, auth)
    assert settings["PREFECT_SERVER_API_AUTH_STRING"] == auth and url == "http://192.0.2.10:4321"
    assert "192.0.2.10" in settings["QABOT_ALLOWED_HOSTS"].split(",")
    (home / "services.json").write_text(json.dumps({"prefect_url": url, "prefect_auth": True}))
    assert services.service_env(home)["PREFECT_API_AUTH_STRING"] == auth


@pytest.mark.parametrize("bad", ["bad host!", "-x", "a" * 300])
def test_bad_bind_host_is_one_line_and_starts_nothing(tmp_path, bad):
    home = tmp_path / "home"
    env = env_for(home, QABOT_BIND_HOST=bad)
    with cleanup(home, env):
        proc = qabot(env, "up", "--no-worker", "--mlflow-port", "1", "--prefect-port", "2", timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qabot: error: QABOT_BIND_HOST="), proc.stderr
        assert not (home / "logs").exists()


def test_prefect_auth_string_on_loopback_when_asked(tmp_path):
    """QABOT_PREFECT_AUTH=1: the server answers 401 without the auth string; the worker and clients have it."""
    home = tmp_path / "home"
    (prefect_port,) = ports(1)
    # MLflow is "external" here (never contacted by `up` or the worker): only Prefect and its worker start
    env = env_for(home, QABOT_PREFECT_AUTH="1", MLFLOW_TRACKING_URI="http://127.0.0.1:9/unused")
    with cleanup(home, env):
        proc = qabot(env, "up", "--prefect-port", str(prefect_port), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        f = home / "prefect-auth"
        assert f"basic auth; 'user:password' is in {f}" in proc.stdout, proc.stdout
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        base = f"http://127.0.0.1:{prefect_port}"
        assert http(f"{base}/api/health")[0] == 200  # health probes stay open
        assert http(f"{base}/api/work_pools/{services.WORK_POOL}")[0] == 401
        wrong = services._auth_header("qabot:wrong")
        assert http(f"{base}/api/work_pools/{services.WORK_POOL}", headers={"Authorization": wrong})[0] == 401
        # the worker authenticates: its heartbeat makes the pool READY
        wait_for(
            lambda: (
                services.prefect_api("GET", f"/work_pools/{services.WORK_POOL}", home=home)["status"]
                == "READY"
            ),
            90,
            "the worker's heartbeat",
            interval=1,
        )


# --- process identity -------------------------------------------------------------------------------------------


def _sleeper() -> subprocess.Popen:
    """An unrelated process in its own session (`setsid sleep`), as the one `qabot down` once killed; returned
    once it runs `sleep` (until the exec, /proc shows the forked parent's identity)."""
    p = subprocess.Popen(["sleep", "120"], start_new_session=True)
    wait_for(lambda: Path(f"/proc/{p.pid}/cmdline").read_bytes() == b"sleep\x00120\x00", 10, "sleep to start")
    return p


def _plant(home: Path, procs: dict, pids: dict) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "services.json").write_text(
        json.dumps(
            {
                "mlflow_url": "http://127.0.0.1:9",
                "prefect_url": "http://127.0.0.1:9",
                "procs": procs,
                "pids": pids,
            }
        )
    )


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)


def test_down_never_signals_a_process_that_only_has_a_recorded_pid(tmp_path):
    home = tmp_path / "home"
    env = env_for(home)
    a, b = _sleeper(), _sleeper()
    try:
        real = services.identify(a.pid)
        # the pid of a live unrelated process: recorded with another start time, or (older records) bare
        _plant(
            home,
            {"mlflow": {**real, "start": real["start"] - 100, "cmdline": ["mlflow", "server"]}},
            {"mlflow": a.pid, "prefect": b.pid},
        )
        proc = qabot(env, "down", timeout=60)
        assert proc.returncode == 0, proc.stderr
        time.sleep(0.5)
        assert a.poll() is None and b.poll() is None, "an unrelated process was signalled"
        assert "stopped: nothing was running" in proc.stdout
        assert "mlflow: not running (stale record), not signalled" in proc.stdout
        assert "prefect: not running (stale record), not signalled" in proc.stdout
    finally:
        _stop(a)
        _stop(b)


def test_status_calls_stale_records_stale(tmp_path):
    home = tmp_path / "home"
    env = env_for(home)
    a = _sleeper()
    try:
        real = services.identify(a.pid)
        assert real["cmdline"] == ["sleep", "120"]
        _plant(
            home,
            {
                "mlflow": {**real, "boot": "another-boot"},  # the same pid and start ticks, before a reboot
                "prefect": {**real, "cmdline": ["prefect", "server"]},  # another program now has that pid
                "worker": real,  # really that process
            },
            {},
        )
        proc = qabot(env, "status", timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
        assert "not running (stale record)" in lines["mlflow"], proc.stdout
        assert "not running (stale record)" in lines["prefect"], proc.stdout
        assert lines["worker"].split()[1] == "running", proc.stdout
        _plant(home, {}, {"mlflow": a.pid})  # an old record without identity is never trusted
        proc = qabot(env, "status", timeout=60)
        assert "mlflow   not running (stale record)" in proc.stdout, proc.stdout
    finally:
        _stop(a)


def test_down_stops_a_verified_process_and_its_group(tmp_path):
    home = tmp_path / "home"
    env = env_for(home)
    leader = subprocess.Popen(["bash", "-c", "sleep 120 & exec sleep 121"], start_new_session=True)
    try:
        child = wait_for(
            lambda: [
                p
                for p in services._group(services.identify(leader.pid) or {"pid": -1, "start": 0})
                if p != leader.pid
            ],
            10,
            "the group's second process",
        )[0]
        _plant(home, {"worker": services.identify(leader.pid)}, {})
        proc = qabot(env, "down", timeout=60)
        assert proc.returncode == 0 and "stopped: worker" in proc.stdout, (proc.stdout, proc.stderr)
        assert leader.wait(timeout=10) == -signal.SIGTERM
        wait_for(
            lambda: not Path(f"/proc/{child}").exists() or services.identify(child) is None, 10, "the child"
        )
    finally:
        _stop(leader)
        kill_leftovers(home)


def test_identity_reads_start_time_boot_and_command_line():
    me = services.identify(os.getpid())
    fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    assert me["start"] == int(fields[19])  # field 22 of /proc/PID/stat
    assert me["boot"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert me["cmdline"][0] == sys.executable or Path(me["cmdline"][0]).name.startswith("python")
    assert services.is_running(me) and not services.is_running({**me, "start": me["start"] + 1})
    assert not services.is_running({"pid": os.getpid()}) and not services.is_running(None)


def test_the_mlflow_server_qabot_starts_listens_on_loopback_whatever_the_environment(tmp_path, monkeypatch):
    """`mlflow/start.sh` binds to $MLFLOW_HOST; `qabot up` passes its environment on, so an MLFLOW_HOST exported
    for another purpose would have exposed the server. `up` sets it to loopback itself."""
    from flows import services

    class Spawned(Exception):
        pass

    seen = {}

    def spawn(name, cmd, env, home):
        seen[name] = env
        raise Spawned

    monkeypatch.setattr(services, "_spawn", spawn)
    monkeypatch.setenv("MLFLOW_HOST", "0.0.0.0")
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(Spawned):
        services.up(home=tmp_path / "home", prefect=False)
    assert seen["mlflow"]["MLFLOW_HOST"] == "127.0.0.1"
