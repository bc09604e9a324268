"""Start and stop the local services: an MLflow tracking server, a Prefect server and a process worker.

Everything lives under $QABOT_HOME (default ./.qabot) and is readable only by its owner (directories 0700,
files 0600): databases, artifacts, logs and services.json. services.json records each started process's
identity: pid, start time (/proc/PID/stat field 22), boot id and command line. `down` signals a process
(and its process group) and `status` calls it running only while that identity still matches, so a pid
reused by another process, or a record from before a reboot, is reported as "not running (stale record)"
and never signalled. `up` and `down` hold one lock per home (flock on $QABOT_HOME/lock): a second `up`
waits, then finds the services running and reuses them. `up` keeps its children and reaps them, so a server
that dies while starting is reported at once with the last lines of its log.

Exposure. Both servers bind 127.0.0.1. MLflow refuses foreign Host headers itself. The Prefect server runs
with CSRF protection on, CORS limited to its own UI's origin and a Host allow-list (flows/prefect_server.py;
Prefect has no such setting). QABOT_BIND_HOST binds the Prefect server elsewhere; beyond loopback it then
requires HTTP basic auth (PREFECT_SERVER_API_AUTH_STRING, generated into $QABOT_HOME/prefect-auth unless
set). QABOT_PREFECT_AUTH=1 asks for the same on loopback (a machine shared with other users). MLflow
telemetry and Prefect analytics are off, for the servers and for the clients (service_env).

When MLFLOW_TRACKING_URI or PREFECT_API_URL is already set, that service is used as it is and not started.
"""

from __future__ import annotations

import base64
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pipeline_lib.config import qabot_home
from tasks.gpu import GPU_LIMIT

PROJECT_DIR = Path(__file__).resolve().parent.parent
WORK_POOL = "qabot-process"
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200}
NAMES = ("mlflow", "prefect", "worker")
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 180.0  # seconds a server may take to answer its health check
STALE = "not running (stale record)"
# Telemetry off for servers and clients: MLflow 3 reads MLFLOW_DISABLE_TELEMETRY (and DO_NOT_TRACK), Prefect's
# server PREFECT_SERVER_ANALYTICS_ENABLED and its client SDK DO_NOT_TRACK. A value the user set explicitly wins.
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class ServiceError(RuntimeError):
    """A service failed; the first line says what, `detail` holds the last lines of its log."""

    def __init__(self, message: str, log: Path | None = None, lines: int = 15, detail: str = ""):
        self.detail = _log_tail(log, lines) if log else detail
        if log:
            message += f"; last lines of {log}:" if self.detail else f"; see {log}"
        super().__init__(message + ("\n" + self.detail if self.detail else ""))


# --- files under QABOT_HOME: owner only --------------------------------------------------------------------


@contextmanager
def _private_umask():
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _state_file(home: Path) -> Path:
    return home / "services.json"


def read_state(home: Path | None = None) -> dict:
    f = _state_file(Path(home or qabot_home()))
    try:
        return json.loads(f.read_text()) if f.exists() else {}
    except json.JSONDecodeError as err:
        raise ServiceError(
            f"{f} is not valid JSON ({err.msg}); remove it after checking no server runs"
        ) from None


def _write_state(home: Path, state: dict) -> None:
    procs = state.get("procs", {})
    state["pids"] = {name: rec["pid"] for name, rec in procs.items()}  # the plain view older callers read
    _write_private(_state_file(home), json.dumps(state, indent=2))


@contextmanager
def _locked(home: Path, timeout: float | None = None):
    """One `up`/`down` at a time per home: an exclusive flock on $QABOT_HOME/lock (released on exit, even
    when the holder is killed). The descriptor is not inherited, so no server keeps the lock."""
    if timeout is None:
        timeout = float(os.environ.get("QABOT_LOCK_TIMEOUT", "600"))
    path = home / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    print(f"qabot: waiting for another `qabot up`/`down` on {home}", file=sys.stderr)
                    told = True
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"another `qabot up`/`down` has held {path} for over {timeout:.0f} s"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


# --- process identity ---------------------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import psutil

        return f"btime:{int(psutil.boot_time())}"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state first); None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # the command name in (...) may hold spaces


def identify(pid: int) -> dict | None:
    """{pid, start, boot, cmdline} of a live process (not a zombie); None when there is none."""
    if not Path("/proc/self/stat").exists():  # no procfs (not Linux)
        import psutil

        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return {
                "pid": pid,
                "start": round(p.create_time(), 2),
                "boot": _boot_id(),
                "cmdline": p.cmdline(),
            }
        except psutil.Error:
            return None
    fields = _proc_stat(pid)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return {
        "pid": pid,
        "start": int(fields[19]),  # field 22: start time in clock ticks after boot
        "boot": _boot_id(),
        "cmdline": [a.decode(errors="replace") for a in cmdline if a],
    }


def is_running(rec: object) -> bool:
    """Whether the process recorded as `rec` is still that process (same pid, start time, boot, command line)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int) or rec["pid"] <= 1:
        return False
    now = identify(rec["pid"])
    return now is not None and all(now[k] == rec.get(k) for k in ("start", "boot", "cmdline"))


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group(rec: dict) -> list[int]:
    """Live processes in the process group the recorded process leads (it was started in a new session),
    started no earlier than it: its own children, never an unrelated group that took the number later."""
    if not Path("/proc/self/stat").exists():  # no procfs: the leader alone
        return [rec["pid"]] if is_running(rec) else []
    pgid, start = rec["pid"], rec["start"]
    members = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        fields = _proc_stat(int(d.name))
        if fields and fields[0] not in ("Z", "X") and int(fields[2]) == pgid and int(fields[19]) >= start:
            members.append(int(d.name))
    return members


def _stop(rec: dict, timeout: float = 10.0) -> bool:
    """Stop the recorded process and its group (SIGTERM, then SIGKILL after `timeout`), only after checking
    its identity. False, and nothing signalled, when it is not (or no longer) that process."""
    if not is_running(rec):
        return False
    pid = rec["pid"]
    os.killpg(pid, signal.SIGTERM)  # the leader is verified, so the group is ours
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _group(rec):
            return True
        time.sleep(0.1)
    for member in _group(rec):  # what is left, one by one: the leader may be gone and its number free
        try:
            os.kill(member, signal.SIGKILL)
        except OSError:
            pass
    _reap(pid)
    return True


def _kill_rest(rec: dict) -> None:
    """SIGKILL what a dead leader left in its process group (its number cannot be reused while the group
    exists, and only members started after it count)."""
    if Path("/proc/self/stat").exists():
        for member in _group(rec):
            try:
                os.kill(member, signal.SIGKILL)
            except OSError:
                pass


# --- health and the Prefect API -----------------------------------------------------------------------------


def _log_tail(log: Path | None, lines: int = 15) -> str:
    """The last lines the latest start wrote to `log` (after its `--- qabot up` marker)."""
    if not log or not log.exists():
        return ""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 65536))
        text = f.read().decode(errors="replace")
    text = text.rsplit("--- qabot up:", 1)[-1].split("\n", 1)[-1] if "--- qabot up:" in text else text
    kept = [line.rstrip()[:500] for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join("  | " + line for line in kept)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def free_port(preferred: int | None = None) -> int:
    if preferred and _port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def _wait(url: str, name: str, proc: subprocess.Popen, rec: dict, log: Path, timeout: float) -> None:
    """Until `url` answers. A child that exits is reaped and reported at once, with its log's last lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            _kill_rest(rec)
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            raise ServiceError(f"{name} {how} while starting", log=log)
        if _healthy(url):
            return
        time.sleep(0.25)
    _stop(rec)
    proc.poll()
    raise ServiceError(f"{name} did not answer at {url} within {timeout:.0f} s and was stopped", log=log)


def _wait_existing(url: str, name: str, rec: dict, timeout: float = 30.0) -> bool:
    """A recorded server that runs: True once it answers; False when it is gone meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(url):
            return True
        if not is_running(rec):
            return False
        time.sleep(0.5)
    raise ServiceError(
        f"{name} (pid {rec['pid']}) runs but does not answer at {url}; `qabot down`, then `qabot up`"
    )


def _auth_header(auth: str) -> str:
    return "Basic " + base64.b64encode(auth.encode()).decode()


def prefect_api(method: str, path: str, body: object = None, home: Path | None = None, timeout: float = 10):
    """One call to the Prefect REST API of `home`'s services (auth and CSRF token included); parsed JSON."""
    env = service_env(home)
    base = env.get("PREFECT_API_URL")
    if not base:
        raise ServiceError("no Prefect server is recorded (qabot up)")
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    if env.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = _auth_header(env["PREFECT_API_AUTH_STRING"])

    def call(m: str, url: str, data: object = None):
        raw = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(url, data=raw, method=m, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read()
        return json.loads(text) if text else None

    if method.upper() != "GET":  # a state-changing method needs a CSRF token when the server protects
        client = f"qabot-{uuid.uuid4().hex}"
        try:
            tok = call("GET", f"{base}/csrf-token?client={client}")
            headers.update({"Prefect-Csrf-Token": tok["token"], "Prefect-Csrf-Client": client})
        except urllib.error.HTTPError as err:
            if err.code != 422:  # 422: CSRF protection is off on that server
                raise
    return call(method.upper(), base + path, body)


# --- settings -------------------------------------------------------------------------------------------------


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def bind_host() -> tuple[str, bool]:
    """Where the Prefect server listens ($QABOT_BIND_HOST, default 127.0.0.1) and whether that is loopback
    only. A wildcard (0.0.0.0, ::) or any other address of this machine is not."""
    host = os.environ.get("QABOT_BIND_HOST", "").strip() or LOOPBACK
    try:
        return host, ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise ValueError(f"QABOT_BIND_HOST={host!r}: not an IP address or a host name")
    if host == "localhost":
        return host, True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        raise ValueError(f"QABOT_BIND_HOST={host!r}: the name does not resolve here") from None
    return host, all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


# S3 and the S3-compatible stores MLflow reaches through boto3 (the `s3` extra)
_BOTO3_SCHEMES = ("s3", "r2", "b2")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")


def mlflow_artifacts() -> str | None:
    """Where the MLflow server `up` starts keeps its artifacts: $MLFLOW_ARTIFACTS, checked before anything
    starts; None for the default ($QABOT_HOME/mlflow/artifacts). A local path is made absolute (the server runs
    in the project directory). s3:// needs a bucket (s3://BUCKET[/PREFIX]) and boto3 in this environment;
    MLFLOW_S3_ENDPOINT_URL, when set, an http(s) URL. Any other scheme must be one MLflow stores artifacts in.
    A bad value is a one-line ValueError naming it (never a secret written into it)."""
    value = os.environ.get("MLFLOW_ARTIFACTS", "").strip()
    if not value:
        return None
    m = _SCHEME.match(value)
    if not m:
        return os.path.abspath(os.path.expanduser(value))
    scheme = m.group(1).lower()
    if scheme == "file":
        return value
    parts = urllib.parse.urlsplit(value)
    if "@" in parts.netloc:
        from pipeline_lib.data.errors import redact_url

        raise ValueError(
            f"MLFLOW_ARTIFACTS={redact_url(value)!r}: no credentials in the URL; the server reads them from "
            "its environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)"
        )
    name = f"MLFLOW_ARTIFACTS={value!r}"
    if not value[m.end() :].startswith("//"):
        raise ValueError(
            f"{name}: expected {'s3://BUCKET[/PREFIX]' if scheme == 's3' else scheme + '://...'}"
        )
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{name}: no bucket; expected s3://BUCKET[/PREFIX]")
        if not _BUCKET.fullmatch(parts.netloc):
            raise ValueError(
                f"{name}: {parts.netloc!r} is not a bucket name; expected s3://BUCKET[/PREFIX] "
                "(the service's address goes in MLFLOW_S3_ENDPOINT_URL)"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{name}: expected s3://BUCKET[/PREFIX], without ?query or #fragment")
    elif scheme not in (_artifact_schemes() or {scheme}):
        raise ValueError(
            f"{name}: MLflow has no artifact store for {scheme}:// "
            "(e.g. s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, a local directory)"
        )
    if scheme in _BOTO3_SCHEMES:
        import importlib.util

        if importlib.util.find_spec("boto3") is None:
            raise ValueError(
                f"{name}: the MLflow server needs boto3 for {scheme}:// (pip install -e '.[s3]')"
            )
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL", "").strip()
        url = urllib.parse.urlsplit(endpoint)
        if endpoint and (url.scheme not in ("http", "https") or not url.hostname):
            raise ValueError(
                f"MLFLOW_S3_ENDPOINT_URL={endpoint!r}: expected http(s)://HOST[:PORT] of the S3-compatible service"
            )
    return value


def _artifact_schemes() -> set[str] | None:
    """MLflow's artifact store schemes, asked only for a scheme other than s3 or file (importing MLflow takes
    seconds); None where they cannot be listed: the server then says."""
    from pipeline_lib.tracking import artifact_schemes

    return artifact_schemes()


def _auth_file(home: Path) -> Path:
    return home / "prefect-auth"


def _prefect_auth(home: Path, required: bool) -> str | None:
    """The basic-auth `user:password` the Prefect server will require, or None for none. Required beyond
    loopback; asked for with QABOT_PREFECT_AUTH=1; taken from PREFECT_SERVER_API_AUTH_STRING when the user
    set it; else generated. Kept in $QABOT_HOME/prefect-auth (0600), where clients find it."""
    given = os.environ.get("PREFECT_SERVER_API_AUTH_STRING", "").strip()
    asked = os.environ.get("QABOT_PREFECT_AUTH", "").strip().lower() in ("1", "true", "yes")
    f = _auth_file(home)
    if not (required or asked or given):
        f.unlink(missing_ok=True)
        return None
    if given and ":" not in given:
        raise ValueError("PREFECT_SERVER_API_AUTH_STRING: expected 'user:password'")
    auth = given or f"qabot:{secrets.token_urlsafe(24)}"
    _write_private(f, auth + "\n")
    return auth


def _prefect_server_env(host: str, loopback: bool, port: int, auth: str | None) -> tuple[dict[str, str], str]:
    """Prefect server settings (its own PREFECT_* names) and the URL clients on this machine use."""
    wildcard = host in ("0.0.0.0", "::", "[::]")
    url_host = LOOPBACK if wildcard or loopback else host
    hosts = [LOOPBACK, "localhost"]
    if not loopback and not wildcard:
        hosts.append(host.strip("[]"))
    if wildcard:
        hosts += [socket.gethostname(), socket.getfqdn()]
    hosts += [h.strip() for h in os.environ.get("QABOT_ALLOWED_HOSTS", "").split(",") if h.strip()]
    hosts = list(dict.fromkeys(h.lower() for h in hosts))
    ui_host = socket.getfqdn() if wildcard else url_host
    env = {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL") or f"http://{ui_host}:{port}/api",
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
        # only the UI's own origins may call the API from a browser
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(f"http://{h}:{port}" for h in hosts),
        "QABOT_ALLOWED_HOSTS": ",".join(hosts),  # Host allow-list of flows/prefect_server.py
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }
    if auth:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    return env, f"http://{url_host}:{port}"


def _telemetry_off() -> dict[str, str]:
    return {k: os.environ.get(k) or v for k, v in TELEMETRY_OFF.items()}


def service_env(home: Path | None = None) -> dict[str, str]:
    """Environment for clients: the URLs of the running services (or those already set by the user), the
    Prefect auth string when its server requires one, telemetry off."""
    home = Path(home or qabot_home())
    st = read_state(home)
    env = {"QABOT_HOME": str(home), "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(home / "prefect"))}
    env["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI") or st.get("mlflow_url", "")
    env["PREFECT_API_URL"] = os.environ.get("PREFECT_API_URL") or (
        f"{st['prefect_url']}/api" if st.get("prefect_url") else ""
    )
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        env["PREFECT_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"]
    elif not os.environ.get("PREFECT_API_URL") and st.get("prefect_auth") and _auth_file(home).exists():
        env["PREFECT_API_AUTH_STRING"] = _auth_file(home).read_text().strip()
    env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
    if not env[
        "PREFECT_API_URL"
    ]:  # a temporary server per run: Prefect's 20 s start limit fails on a busy machine
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"
        )
    env.update(_telemetry_off())
    return {k: v for k, v in env.items() if v}


# --- up / down / status -------------------------------------------------------------------------------------


def _spawn(name: str, cmd: list[str], env: dict, home: Path) -> tuple[subprocess.Popen, dict]:
    """Start `cmd` in its own session (`down` stops its whole group), log to logs/NAME.log; its identity."""
    log = _private_dir(home / "logs") / f"{name}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as fh:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        fh.write(f"--- qabot up: {name} {stamp} ---\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=PROJECT_DIR,
            start_new_session=True,
            umask=0o077,
        )
    rec = identify(proc.pid)
    if rec is None:
        rc = proc.wait(timeout=10)
        raise ServiceError(f"{name} exited with code {rc} as it started", log=log)
    return proc, rec


def _started(name: str, proc: subprocess.Popen, rec: dict, home: Path, state: dict) -> None:
    """Record a started process (before waiting for it, so an interrupted `up` leaves it to `down`)."""
    state.setdefault("procs", {})[name] = rec
    _write_state(home, state)


def _refresh(name: str, proc: subprocess.Popen, rec: dict, home: Path, state: dict) -> None:
    """Its command line once it answers: mlflow/start.sh is bash until it execs the server."""
    now = identify(proc.pid)
    if now and now["start"] == rec["start"]:
        state["procs"][name] = now
        _write_state(home, state)


def up(
    home: Path | None = None,
    mlflow_port: int | None = None,
    prefect_port: int | None = None,
    worker: bool = True,
    prefect: bool = True,
) -> dict:
    """Start whatever is not running yet; return the state (URLs, pids). `prefect=False`: the MLflow server
    alone (no Prefect server, worker or concurrency limit)."""
    home = Path(home or qabot_home())
    with _private_umask():
        _private_dir(home)
        with _locked(home):
            return _up(home, mlflow_port, prefect_port, worker, prefect)


def _up(home: Path, mlflow_port: int | None, prefect_port: int | None, worker: bool, prefect: bool) -> dict:
    host, loopback = bind_host()  # bad input stops here, before anything starts
    artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else mlflow_artifacts()
    state = read_state(home)
    procs = state.setdefault("procs", {})
    base_env = {
        **os.environ,
        "QABOT_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PYTHONUNBUFFERED": "1",
        **_telemetry_off(),
    }
    bindir = Path(sys.executable).parent
    logs = home / "logs"

    if os.environ.get("MLFLOW_TRACKING_URI"):
        state["mlflow_url"] = os.environ["MLFLOW_TRACKING_URI"]
        state["mlflow_external"] = True
        state.pop("mlflow_artifacts", None)  # that server's own business
    elif (
        is_running(procs.get("mlflow"))
        and artifacts
        and state.get("mlflow_artifacts", artifacts) != artifacts
    ):
        raise ServiceError(
            f"the MLflow server runs with its artifacts in {state['mlflow_artifacts']}, not {artifacts}; "
            "`qabot down` first"
        )
    elif not (
        is_running(procs.get("mlflow"))
        and _wait_existing(state["mlflow_url"] + "/health", "MLflow", procs["mlflow"])
    ):
        port = mlflow_port or free_port(DEFAULT_PORTS["mlflow"])
        store = _private_dir(home / "mlflow")
        env = {
            **base_env,
            "MLFLOW_HOST": LOOPBACK,  # always: an MLFLOW_HOST exported for something else must not widen it
            "MLFLOW_PORT": str(port),
            "MLFLOW_HOME": str(store),
            "MLFLOW_BIN": str(bindir / "mlflow"),
            "MLFLOW_ARTIFACTS": artifacts or str(store / "artifacts"),
        }
        proc, rec = _spawn("mlflow", ["bash", str(PROJECT_DIR / "mlflow" / "start.sh")], env, home)
        state["mlflow_url"] = f"http://{LOOPBACK}:{port}"
        state["mlflow_artifacts"] = env["MLFLOW_ARTIFACTS"]
        state.pop("mlflow_external", None)
        _started("mlflow", proc, rec, home, state)
        _wait(state["mlflow_url"] + "/health", "MLflow server", proc, rec, logs / "mlflow.log", START_TIMEOUT)
        _refresh("mlflow", proc, rec, home, state)
    if not prefect:
        _write_state(home, state)
        return state

    if os.environ.get("PREFECT_API_URL"):
        state["prefect_url"] = os.environ["PREFECT_API_URL"].removesuffix("/api")
        state["prefect_external"] = True
    elif is_running(procs.get("prefect")) and state.get("prefect_bind_host", LOOPBACK) != host:
        raise ServiceError(
            f"the Prefect server runs bound to {state.get('prefect_bind_host', LOOPBACK)}, not {host}; "
            "`qabot down` first"
        )
    elif not (
        is_running(procs.get("prefect"))
        and _wait_existing(state["prefect_url"] + "/api/health", "Prefect", procs["prefect"])
    ):
        auth = _prefect_auth(home, required=not loopback)
        port = prefect_port or free_port(DEFAULT_PORTS["prefect"])
        _private_dir(home / "prefect")
        settings, url = _prefect_server_env(host, loopback, port, auth)
        env = {k: v for k, v in base_env.items() if k != "PREFECT_SERVER_API_AUTH_STRING"}
        proc, rec = _spawn(
            "prefect", [sys.executable, "-m", "flows.prefect_server"], {**env, **settings}, home
        )
        state.update(prefect_url=url, prefect_auth=bool(auth), prefect_bind_host=host)
        state.pop("prefect_external", None)
        _started("prefect", proc, rec, home, state)
        _wait(f"{url}/api/health", "Prefect server", proc, rec, logs / "prefect.log", START_TIMEOUT)
        if _stop(procs.get("worker") or {}):  # a worker of the previous server: it polls a dead URL
            del procs["worker"]

    if state.get("prefect_auth"):
        state["prefect_auth_file"] = str(_auth_file(home))
    else:
        state.pop("prefect_auth_file", None)
    _write_state(home, state)
    ensure_gpu_limit(home)
    cenv = {**base_env, **service_env(home)}
    if worker and not is_running(procs.get("worker")):
        created = subprocess.run(
            [str(bindir / "prefect"), "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
            env=cenv,
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if created.returncode != 0:
            out = (created.stdout + created.stderr).strip().splitlines()[-10:]
            raise ServiceError(
                f"creating work pool {WORK_POOL} failed:", detail="\n".join("  | " + x for x in out)
            )
        # Poll every 2 s rather than Prefect's 10: a run started from the UI or `qabot demo` begins at once.
        wenv = {"PREFECT_WORKER_QUERY_SECONDS": "2", **cenv}
        proc, rec = _spawn(
            "worker",
            [str(bindir / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            wenv,
            home,
        )
        _started("worker", proc, rec, home, state)
    _write_state(home, state)
    return state


class Stopped(list):
    """Names of the services `down` stopped; `.stale`: recorded ones that were not running (not signalled)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.stale: list[str] = []


def down(home: Path | None = None) -> Stopped:
    """Stop the processes `up` started (worker first) whose identity still matches; return what was stopped."""
    home = Path(home or qabot_home())
    stopped = Stopped()
    if not home.is_dir():
        return stopped
    with _private_umask(), _locked(home):
        state = read_state(home)
        procs, legacy = state.get("procs", {}), state.get("pids", {})
        for name in ("worker", "prefect", "mlflow"):
            if name in procs and _stop(procs[name]):
                stopped.append(name)
            elif name in procs or name in legacy:
                stopped.stale.append(name)
            (home / "pids" / f"{name}.pid").unlink(missing_ok=True)
        if state:
            state["procs"] = {}
            _write_state(home, state)
    return stopped


def status(home: Path | None = None) -> dict:
    """What runs: each service's state (identity-checked), URL and health; the work pool with its run limit
    and workers; the `qabot-gpu` limit with its slots in use; deployment schedules and their next runs; the
    latest flow runs with their state."""
    home = Path(home or qabot_home())
    state = read_state(home)
    procs, legacy = state.get("procs", {}), state.get("pids", {})
    out: dict = {"home": str(home), "started": bool(state), "services": {}}
    for name in NAMES:
        rec = procs.get(name)
        pid = rec.get("pid") if isinstance(rec, dict) else legacy.get(name)
        external = state.get(f"{name}_external")
        if external:
            run = "external"
        elif rec is None and pid is None:
            run = "not running"
        else:
            run = "running" if is_running(rec) else STALE
        item = {"state": run, "pid": pid}
        url = state.get(f"{name}_url")
        if url and run in ("running", "external"):
            item["url"] = url
            health = {"mlflow": "/health", "prefect": "/api/health"}[name]
            item["answers"] = url.startswith("http") and _healthy(url + health)
        out["services"][name] = item
    pool: dict = {"name": WORK_POOL}
    if out["services"]["prefect"].get("answers"):
        try:
            wp = prefect_api("GET", f"/work_pools/{WORK_POOL}", home=home, timeout=5)
            pool["status"] = wp.get("status")
            pool["concurrency_limit"] = wp.get("concurrency_limit")
            workers = prefect_api("POST", f"/work_pools/{WORK_POOL}/workers/filter", {}, home=home, timeout=5)
            pool["workers"] = [
                {
                    "name": w["name"],
                    "status": w.get("status"),
                    "heartbeat_age_s": _age(w.get("last_heartbeat_time")),
                }
                for w in workers or []
            ]
        except urllib.error.HTTPError as err:
            pool["status"] = "absent" if err.code == 404 else f"HTTP {err.code}"
        except (OSError, ValueError) as err:
            pool["status"] = f"unknown ({err})"
    out["pool"] = pool
    if out["services"]["prefect"].get("answers"):
        out.update(_prefect_overview(home))
    return out


def ensure_gpu_limit(home: Path | None = None) -> int:
    """The `qabot-gpu` concurrency limit every flow run takes a slot of (tasks/gpu.py): created with
    `devices.gpu_slots()` slots when missing; set to $QABOT_GPU_SLOTS when that is given; else left as is."""
    from pipeline_lib.devices import gpu_slots

    want = gpu_slots()
    try:
        try:
            have = prefect_api("GET", f"/v2/concurrency_limits/{GPU_LIMIT}", home=home)["limit"]
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
            prefect_api("POST", "/v2/concurrency_limits/", {"name": GPU_LIMIT, "limit": want}, home=home)
            return want
        if os.environ.get("QABOT_GPU_SLOTS") and have != want:
            prefect_api("PATCH", f"/v2/concurrency_limits/{GPU_LIMIT}", {"limit": want}, home=home)
            return want
        return have
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ServiceError(f"setting up the concurrency limit {GPU_LIMIT} failed: {err}") from None


def _prefect_overview(home: Path, runs: int = 5) -> dict:
    """The GPU limit and its slots in use, deployment schedules with their next runs, the latest flow runs."""
    out: dict = {}
    try:
        gcl = prefect_api("GET", f"/v2/concurrency_limits/{GPU_LIMIT}", home=home, timeout=5)
        out["gpu_limit"] = {"name": GPU_LIMIT, "limit": gcl.get("limit"), "in_use": gcl.get("active_slots")}
    except urllib.error.HTTPError as err:
        out["gpu_limit"] = {"name": GPU_LIMIT, "status": "absent" if err.code == 404 else f"HTTP {err.code}"}
    except (OSError, ValueError) as err:
        out["gpu_limit"] = {"name": GPU_LIMIT, "status": f"unknown ({err})"}
    try:
        now = datetime.now(timezone.utc).isoformat()
        deployments = prefect_api("POST", "/deployments/filter", {}, home=home, timeout=5) or []
        names = {d["id"]: d["name"] for d in deployments}
        out["schedules"] = [
            {
                "deployment": d["name"],
                "schedule": _schedule_text(s.get("schedule") or {}),
                "active": bool(s.get("active")) and not d.get("paused"),
            }
            for d in deployments
            for s in d.get("schedules") or []
        ]
        upcoming = prefect_api(
            "POST",
            "/flow_runs/filter",
            {
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 3,
                "flow_runs": {
                    "state": {"type": {"any_": ["SCHEDULED"]}},
                    "expected_start_time": {"after_": now},
                },
            },
            home=home,
            timeout=5,
        )
        recent = prefect_api(
            "POST",
            "/flow_runs/filter",
            {
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": runs,
                "flow_runs": {"expected_start_time": {"before_": now}},
            },
            home=home,
            timeout=5,
        )
        out["upcoming"] = [_run_item(r, names) for r in upcoming or []]
        out["flow_runs"] = [_run_item(r, names) for r in recent or []]
    except (OSError, ValueError) as err:
        out["flow_runs_error"] = str(err)
    return out


def _schedule_text(schedule: dict) -> str:
    if schedule.get("cron"):
        return f"cron '{schedule['cron']}' ({schedule.get('timezone') or 'UTC'})"
    if schedule.get("interval"):
        return f"every {schedule['interval']} s"
    return schedule.get("rrule") or "?"


def _run_item(run: dict, deployments: dict[str, str]) -> dict:
    state = run.get("state") or {}
    return {
        "name": run.get("name"),
        "state": state.get("name") or run.get("state_name"),
        "message": (state.get("message") or "").splitlines()[0][:120] if state.get("message") else "",
        "deployment": deployments.get(run.get("deployment_id"), "-"),
        "start": run.get("start_time") or run.get("expected_start_time"),
    }


def _age(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round((datetime.now(timezone.utc) - then).total_seconds(), 1)


def deploy(home: Path | None = None) -> None:
    """Register the deployments of prefect.yaml with the Prefect server (work pool `qabot-process`)."""
    home = Path(home or qabot_home())
    env = {**os.environ, **service_env(home), "QABOT_PROJECT_DIR": str(PROJECT_DIR)}
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    proc = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=PROJECT_DIR, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ServiceError("prefect deploy failed:\n" + (proc.stdout + proc.stderr)[-3000:])
