"""Start and stop the local services: an MLflow tracking server, a Prefect server and a process worker.

Everything lives under $QABOT_HOME (default ./.qabot): databases, artifacts, logs, pid files. `down` stops
exactly the processes `up` started (their pid files), nothing else. When MLFLOW_TRACKING_URI or
PREFECT_API_URL is already set, that service is used as it is and not started here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline_lib.config import qabot_home

PROJECT_DIR = Path(__file__).resolve().parent.parent
WORK_POOL = "qabot-process"
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200}


class ServiceError(RuntimeError):
    pass


def _state_file(home: Path) -> Path:
    return home / "services.json"


def read_state(home: Path | None = None) -> dict:
    f = _state_file(home or qabot_home())
    return json.loads(f.read_text()) if f.exists() else {}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(preferred: int | None = None) -> int:
    if preferred and _port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def _wait(url: str, name: str, pid: int, log: Path, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _healthy(url):
            return
        if not _alive(pid):
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise ServiceError(f"{name} exited while starting; see {log}\n{tail}")
        time.sleep(0.5)
    raise ServiceError(f"{name} did not answer at {url} within {timeout:.0f} s; see {log}")


def _spawn(name: str, cmd: list[str], env: dict, home: Path) -> int:
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_DIR, start_new_session=True
        )  # its own process group: `down` stops it whole
    (home / "pids").mkdir(exist_ok=True)
    (home / "pids" / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def service_env(home: Path | None = None) -> dict[str, str]:
    """Environment for clients: the URLs of the running services (or those already set by the user)."""
    home = home or qabot_home()
    st = read_state(home)
    env = {"QABOT_HOME": str(home), "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(home / "prefect"))}
    env["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI") or st.get("mlflow_url", "")
    env["PREFECT_API_URL"] = os.environ.get("PREFECT_API_URL") or (
        f"{st['prefect_url']}/api" if st.get("prefect_url") else ""
    )
    env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
    return {k: v for k, v in env.items() if v}


def up(
    home: Path | None = None,
    mlflow_port: int | None = None,
    prefect_port: int | None = None,
    worker: bool = True,
) -> dict:
    """Start whatever is not running yet; return the state (URLs, pids)."""
    home = home or qabot_home()
    home.mkdir(parents=True, exist_ok=True)
    state = read_state(home)
    pids = state.setdefault("pids", {})
    base_env = {
        **os.environ,
        "QABOT_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }
    bindir = Path(sys.executable).parent

    if os.environ.get("MLFLOW_TRACKING_URI"):
        state["mlflow_url"] = os.environ["MLFLOW_TRACKING_URI"]
        state["mlflow_external"] = True
    elif not (pids.get("mlflow") and _alive(pids["mlflow"]) and _healthy(state["mlflow_url"] + "/health")):
        port = mlflow_port or free_port(DEFAULT_PORTS["mlflow"])
        store = home / "mlflow"
        store.mkdir(exist_ok=True)
        env = {
            **base_env,
            "MLFLOW_PORT": str(port),
            "MLFLOW_HOME": str(store),
            "MLFLOW_BIN": str(bindir / "mlflow"),
        }
        pid = _spawn("mlflow", ["bash", str(PROJECT_DIR / "mlflow" / "start.sh")], env, home)
        state["mlflow_url"] = f"http://127.0.0.1:{port}"
        pids["mlflow"] = pid
        _wait(state["mlflow_url"] + "/health", "MLflow server", pid, home / "logs" / "mlflow.log")

    if os.environ.get("PREFECT_API_URL"):
        state["prefect_url"] = os.environ["PREFECT_API_URL"].removesuffix("/api")
        state["prefect_external"] = True
    elif not (
        pids.get("prefect") and _alive(pids["prefect"]) and _healthy(state["prefect_url"] + "/api/health")
    ):
        port = prefect_port or free_port(DEFAULT_PORTS["prefect"])
        env = {
            **base_env,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        }
        pid = _spawn(
            "prefect",
            [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env,
            home,
        )
        state["prefect_url"] = f"http://127.0.0.1:{port}"
        pids["prefect"] = pid
        _wait(state["prefect_url"] + "/api/health", "Prefect server", pid, home / "logs" / "prefect.log")

    _state_file(home).write_text(json.dumps(state, indent=2))
    cenv = {**base_env, **service_env(home)}
    if worker and not (pids.get("worker") and _alive(pids["worker"])):
        subprocess.run(
            [str(bindir / "prefect"), "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
            env=cenv,
            cwd=PROJECT_DIR,
            check=True,
            capture_output=True,
        )
        pids["worker"] = _spawn(
            "worker",
            [str(bindir / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            cenv,
            home,
        )
    _state_file(home).write_text(json.dumps(state, indent=2))
    return state


def down(home: Path | None = None) -> list[str]:
    """Stop the processes `up` started (worker first); return what was stopped."""
    home = home or qabot_home()
    state = read_state(home)
    stopped = []
    for name in ("worker", "prefect", "mlflow"):
        pid = state.get("pids", {}).get(name)
        if pid and _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                continue
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.2)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(name)
        (home / "pids" / f"{name}.pid").unlink(missing_ok=True)
    if state:
        state["pids"] = {}
        _state_file(home).write_text(json.dumps(state, indent=2))
    return stopped


def deploy(home: Path | None = None) -> None:
    """Register the deployments of prefect.yaml with the Prefect server (work pool `qabot-process`)."""
    home = home or qabot_home()
    env = {**os.environ, **service_env(home), "QABOT_PROJECT_DIR": str(PROJECT_DIR)}
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    proc = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=PROJECT_DIR, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ServiceError("prefect deploy failed:\n" + (proc.stdout + proc.stderr)[-3000:])
