"""One training run per GPU: the `qabot-gpu` global concurrency limit a flow run takes (tasks/gpu.py), the
limit `qabot up` sets up, and `qabot status` showing it with the pool, the schedules and the latest runs.
Prefect's client and API are replaced by fakes (a real server costs half a minute to start); that Prefect's
limit serialises is Prefect's own behaviour, checked by hand against a real server."""

from __future__ import annotations

import contextlib
import io
import urllib.error
import uuid

import pytest
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from flows import cli, services
from tasks import gpu


class FakeClient:
    def __init__(self, limits: dict[str, int], race: int | None = None):
        self.limits, self.race, self.created = limits, race, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_global_concurrency_limit_by_name(self, name):
        if name not in self.limits:
            raise ObjectNotFound(http_exc=Exception("404"))
        return type("Limit", (), {"limit": self.limits[name]})

    def create_global_concurrency_limit(self, limit):
        if self.race is not None:  # another run created it first
            self.limits[limit.name] = self.race
            raise ObjectAlreadyExists(http_exc=Exception("409"))
        self.created.append((limit.name, limit.limit))
        self.limits[limit.name] = limit.limit


@pytest.fixture
def prefect_fakes(monkeypatch):
    import logging

    import prefect
    import prefect.client.orchestration
    import prefect.concurrency.sync

    held = []

    @contextlib.contextmanager
    def concurrency(names, **kwargs):
        held.append((names, kwargs))
        yield

    client = FakeClient({})
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client=False: client)
    monkeypatch.setattr(prefect.concurrency.sync, "concurrency", concurrency)
    monkeypatch.setattr(prefect, "get_run_logger", lambda: logging.getLogger("test-gpu"))
    return client, held


def test_a_run_creates_a_missing_limit_and_holds_one_slot(prefect_fakes, monkeypatch):
    client, held = prefect_fakes
    monkeypatch.setenv("QABOT_GPU_SLOTS", "2")
    run_id = str(uuid.uuid4())
    with gpu.gpu_slot(run_id):
        assert len(held) == 1
    assert client.created == [("qabot-gpu", 2)]
    ((names, kwargs),) = held
    assert names == "qabot-gpu" and kwargs["occupy"] == 1 and kwargs["strict"] is True
    assert str(kwargs["holder"].id) == run_id and kwargs["holder"].type == "flow_run"
    assert kwargs["raise_on_lease_renewal_failure"] is False
    client.limits["qabot-gpu"] = 1  # set by hand: a run leaves it as it is
    with gpu.gpu_slot(None):
        pass
    assert client.created == [("qabot-gpu", 2)] and client.limits["qabot-gpu"] == 1
    assert held[1][1]["holder"] is None


def test_two_runs_creating_the_limit_at_once_both_use_it(prefect_fakes, monkeypatch):
    client, _ = prefect_fakes
    client.race = 1
    assert gpu.ensure_limit(slots=3) == 1 and client.created == []


class FakeApi:
    """Prefect's REST API as `services.prefect_api` calls it: canned answers by method and path."""

    def __init__(self, answers: dict):
        self.answers, self.calls = answers, []

    def __call__(self, method, path, body=None, home=None, timeout=10):
        self.calls.append((method, path, body))
        answer = self.answers.get((method, path))
        if isinstance(answer, int):
            raise urllib.error.HTTPError(path, answer, "error", {}, io.BytesIO())
        return answer


@pytest.mark.parametrize(
    ("existing", "env", "call"),
    [
        (404, None, ("POST", "/v2/concurrency_limits/", {"name": "qabot-gpu", "limit": 1})),
        ({"limit": 2}, None, None),  # set by hand: left as it is
        ({"limit": 2}, "3", ("PATCH", "/v2/concurrency_limits/qabot-gpu", {"limit": 3})),
    ],
)
def test_up_sets_up_the_gpu_limit(monkeypatch, tmp_path, existing, env, call):
    api = FakeApi({("GET", "/v2/concurrency_limits/qabot-gpu"): existing})
    monkeypatch.setattr(services, "prefect_api", api)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: one slot
    if env:
        monkeypatch.setenv("QABOT_GPU_SLOTS", env)
    else:
        monkeypatch.delenv("QABOT_GPU_SLOTS", raising=False)
    services.ensure_gpu_limit(tmp_path)
    assert api.calls[1:] == ([call] if call else [])


def test_status_shows_pool_limit_gpu_slots_schedules_and_latest_runs(monkeypatch, tmp_path, capsys):
    dep = str(uuid.uuid4())
    api = FakeApi(
        {
            ("GET", "/work_pools/qabot-process"): {"status": "READY", "concurrency_limit": None},
            ("POST", "/work_pools/qabot-process/workers/filter"): [
                {"name": "w1", "status": "ONLINE", "last_heartbeat_time": None}
            ],
            ("GET", "/v2/concurrency_limits/qabot-gpu"): {"limit": 1, "active_slots": 1},
            ("POST", "/deployments/filter"): [
                {
                    "id": dep,
                    "name": "report-weekly",
                    "paused": False,
                    "schedules": [{"active": False, "schedule": {"cron": "0 3 * * 1", "timezone": "UTC"}}],
                }
            ],
            ("POST", "/flow_runs/filter"): [
                {
                    "name": "calm-fox",
                    "deployment_id": dep,
                    "start_time": "2026-01-05T03:00:02Z",
                    "state": {
                        "name": "Completed",
                        "message": "training skipped: data and settings unchanged",
                    },
                }
            ],
        }
    )
    monkeypatch.setattr(services, "prefect_api", api)
    monkeypatch.setattr(services, "is_running", lambda rec: True)
    monkeypatch.setattr(services, "_healthy", lambda url: True)
    monkeypatch.setenv("QABOT_HOME", str(tmp_path))
    procs = {n: {"pid": 100 + k} for k, n in enumerate(services.NAMES)}
    state = {"procs": procs, "mlflow_url": "http://127.0.0.1:5000", "prefect_url": "http://127.0.0.1:4200"}
    monkeypatch.setattr(services, "read_state", lambda home=None: state)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "pool     qabot-process: READY, 1 of 1 worker(s) online, flow-run limit none\n" in out
    assert "gpu      qabot-gpu: 1 slot(s), 1 in use (one training flow run per slot)\n" in out
    assert (
        "schedule report-weekly: cron '0 3 * * 1' (UTC), inactive: no runs are scheduled until it is switched on"
        in out
    )
    assert "runs     1 latest flow run(s):\n" in out
    assert (
        "         calm-fox: Completed, report-weekly, 2026-01-05T03:00:02Z - training skipped: data and "
        "settings unchanged" in out
    )
