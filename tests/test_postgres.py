"""Scale-out on existing engines: MLflow with a PostgreSQL backend store and Prefect with a PostgreSQL
database, started by `qabot up` from the documented settings (`MLFLOW_BACKEND_URI`,
`PREFECT_API_DATABASE_CONNECTION_URL`), run the smoke flow; the records are then read from PostgreSQL itself.

The test starts its own PostgreSQL cluster (Debian's `postgresql` package: `initdb`, `pg_ctl`) on a free
loopback port in a temporary directory; `.ci/run` installs the package where it is missing.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from servicekit import cleanup, env_for, ports, qabot

pytestmark = pytest.mark.slow

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
CONFIG = """profile: smoke
name: pg
models:
  - {name: llama-tiny, base_model: "tiny:llama", batch_size: 4, max_length: 256, max_steps: 3}
training: {save_steps: 3, logging_steps: 1}
inference: {max_new_tokens: 4}
tracking: {experiment: qabot-pg, system_metrics: false}
"""


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def postgres():
    if not BIN:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql; .ci/run does)")
    bindir = Path(BIN[-1])
    # its own directory outside pytest's (0700, root's): the server runs as `postgres` when we are root
    root = Path(tempfile.mkdtemp(prefix="qabot-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, (port,) = root / "data", ports(1)
    init = _as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "qabot", "-E", "UTF8"])
    assert init.returncode == 0, init.stderr[-2000:]
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = _as_postgres(
        [str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"]
    )
    assert start.returncode == 0, (start.stdout, start.stderr)
    try:
        for db in ("mlflow", "prefect"):
            made = _as_postgres(
                [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "qabot", db]
            )
            assert made.returncode == 0, made.stderr

        def sql(db: str, query: str) -> str:
            out = _as_postgres(
                [
                    str(bindir / "psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "qabot",
                    "-d",
                    db,
                    "-tAc",
                    query,
                ]
            )
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()

        yield {"url": f"qabot@127.0.0.1:{port}", "sql": sql}
    finally:
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def test_the_smoke_flow_runs_on_postgresql(postgres, tmp_path):
    home = tmp_path / "home"
    env = env_for(
        home,
        MLFLOW_BACKEND_URI=f"postgresql://{postgres['url']}/mlflow",
        PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{postgres['url']}/prefect",
    )
    cfg = tmp_path / "pg.yaml"
    cfg.write_text(CONFIG)
    mlflow_port, prefect_port = ports(2)
    with cleanup(home, env):
        up = qabot(
            env,
            "up",
            "--no-worker",
            "--mlflow-port",
            str(mlflow_port),
            "--prefect-port",
            str(prefect_port),
            timeout=300,
        )
        assert up.returncode == 0, up.stderr[-3000:]
        run = qabot(env, "run", "--config", str(cfg), "--no-services", timeout=400)
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
        summary = json.loads(run.stdout[run.stdout.index("{") : run.stdout.rindex("}") + 1])
    # what the servers recorded is in PostgreSQL, not in a file under the home
    sql = postgres["sql"]
    assert (
        sql("mlflow", f"select status from runs where run_uuid = '{summary['parent_run_id']}'") == "FINISHED"
    )
    assert sql("mlflow", "select count(*) from registered_models where name = 'pg-llama-tiny'") == "1"
    flow_state = sql("prefect", f"select state_name from flow_run where id = '{summary['flow_run_id']}'")
    assert flow_state == "Completed"
    assert (
        int(sql("prefect", f"select count(*) from task_run where flow_run_id = '{summary['flow_run_id']}'"))
        >= 8
    )
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
