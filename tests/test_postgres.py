"""Scale-out on existing engines: MLflow with a PostgreSQL backend store and Prefect with a PostgreSQL
database, started by `qabot up` from the documented settings (`MLFLOW_BACKEND_URI`,
`PREFECT_API_DATABASE_CONNECTION_URL`).

The shared service stack (tests/conftest.py) runs on a PostgreSQL cluster of its own wherever Debian's
`postgresql` server package is installed (`.ci/run` installs it), so every end-to-end run of the smoke flow
goes through it, and tests/test_e2e.py reads its runs back from PostgreSQL. Here: nothing went to SQLite,
and what a client records through each server is a row in PostgreSQL.
"""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def pg(stack):
    if stack["postgres"] is None:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql; .ci/run does)")
    return stack["postgres"]


def test_both_servers_keep_their_records_in_postgresql(stack, pg):
    from flows import services
    from mlflow import MlflowClient

    name = f"pg-check-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=stack["state"]["mlflow_url"])
    exp = client.create_experiment(name)
    run = client.create_run(exp, run_name=name)
    client.log_metric(run.info.run_id, "bits_per_byte", 1.25)
    assert pg["sql"]("mlflow", f"select name from experiments where experiment_id = {exp}") == name
    assert pg["sql"]("mlflow", f"select value from metrics where run_uuid = '{run.info.run_id}'") == "1.25"

    # `qabot up` created the work pool through the Prefect API: its row is in PostgreSQL
    pools = services.prefect_api("POST", "/work_pools/filter", {}, home=stack["home"])
    assert services.WORK_POOL in {p["name"] for p in pools}
    assert (
        pg["sql"]("prefect", f"select type from work_pool where name = '{services.WORK_POOL}'") == "process"
    )
    # and neither server fell back to a SQLite file under the home
    assert not list(stack["home"].rglob("*.db")), list(stack["home"].rglob("*.db"))
