"""Shared fixtures: tiny models of each real architecture, built once per test session, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "FALSE")

from pipeline_lib.architectures import ARCHS  # noqa: E402  (every family in the registry)

# Under pytest-xdist (`make test` runs two workers, one per core), each worker computes with one thread: two
# small-matrix workloads side by side go further than one using both cores.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Module fixtures that train or rebuild models: the tests using one stay on one worker, so it is computed once.
EXPENSIVE_MODULE_FIXTURES = ("trained", "sharp_models", "llama_train_set")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, str]:
    """{arch: path} of tiny Llama, Bloom and Falcon models with their tokenizers, from the shared tiny-model
    cache (copied from the package's shipped builds, or built once per recipe where none is shipped; reused by
    later sessions and by `make demo`). Each xdist worker asks in another order, so where models must be
    built two workers build two at once (the cache locks per model)."""
    from pipeline_lib.tiny import materialize_tiny

    shift = int(WORKER.removeprefix("gw") or 0) if WORKER.startswith("gw") else 0
    order = ARCHS[shift % len(ARCHS) :] + ARCHS[: shift % len(ARCHS)]
    paths = {arch: str(materialize_tiny(f"tiny:{arch}")[0]) for arch in order}
    return {arch: paths[arch] for arch in ARCHS}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without a GPU; group tests for xdist's `--dist loadgroup`: every test of the shared
    service stack on one worker (one stack per run), and the tests of an expensive module fixture together.
    The stack's tests go first: they are the longest chain."""
    import torch

    if WORKER:
        torch.set_num_threads(1)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    grouping = bool(getattr(config.option, "loadgroup", False))
    for item in items:
        names = item.fixturenames
        group = "stack" if "stack" in names else None
        for fixture in EXPENSIVE_MODULE_FIXTURES if group is None else ():
            if fixture in names:
                group = f"{item.module.__name__}.{fixture}"
                break
        if group and grouping and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):
            _suffix_nodeid(item, group)
    items.sort(key=_schedule_rank)


# Tests of half a minute or more that are not `slow` (they start servers or train): scheduling only.
LONG = {"test_prefect_auth_string_on_loopback_when_asked", "test_tiny_run_end_to_end"}


def _schedule_rank(item) -> int:
    """Longest first, so that two workers end together (`make test` passes --no-loadscope-reorder, which keeps
    this order instead of xdist's by test count): the stack's chain, then each expensive fixture's group, then
    the long single tests, then the rest."""
    if "stack" in item.fixturenames:
        return 0
    if any(f in item.fixturenames for f in EXPENSIVE_MODULE_FIXTURES):
        return 1
    return 2 if "slow" in item.keywords or item.originalname in LONG else 3


def _suffix_nodeid(item, group: str) -> None:
    """`NODEID@group`, the form xdist's `loadgroup` scheduler keeps on one worker. (xdist does this for an
    `xdist_group` mark by assigning `item._nodeid`, which pytest 9 no longer reads: its ids are `item._id`.)"""
    grouped = f"{item.nodeid}@{group}"
    if hasattr(item, "_id"):
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(grouped)
    else:
        item._nodeid = grouped


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The real local services, shared by every test that needs them (e2e, security, faults, postgres),
    started the hard way: two `qabot up` at once (with the worker) on a fresh QABOT_HOME and free 127.0.0.1
    ports, on a PostgreSQL cluster of their own where the server package is installed. At the end `qabot down`
    must stop every process they started (checked); whatever is left is killed."""
    import json
    import signal
    import time
    from contextlib import ExitStack

    from servicekit import (
        env_for,
        kill_leftovers,
        leftovers,
        ports,
        postgres_cluster,
        postgres_env,
        qabot,
        spawn,
        wait_for,
    )

    home = tmp_path_factory.mktemp("stack") / "home"
    cluster = ExitStack()
    # where Debian's PostgreSQL server is installed (CI installs it), both servers keep their records there —
    # the scale-out path, under every end-to-end run; elsewhere in SQLite files under the home
    pg = cluster.enter_context(postgres_cluster())
    env = env_for(home, **postgres_env(pg))
    mlflow_port, prefect_port = ports(2)
    args = ("up", "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port))
    results = []
    try:
        ups = [spawn(env, *args), spawn(env, *args)]
        t0 = time.monotonic()
        try:
            for up in ups:
                out, err = up.communicate(timeout=max(1.0, 400 - (time.monotonic() - t0)))
                results.append((up.returncode, out, err, round(time.monotonic() - t0, 1)))
        finally:
            for up in ups:
                if up.poll() is None:
                    os.killpg(up.pid, signal.SIGKILL)
                    up.communicate(timeout=30)
        assert all(r[0] == 0 for r in results), [r[2][-2000:] for r in results]
        state = json.loads((home / "services.json").read_text())
        yield {
            "home": home,
            "env": env,
            "state": state,
            "results": results,
            "mlflow": mlflow_port,
            "prefect": prefect_port,
            "postgres": pg,
        }
        down = qabot(env, "down", timeout=90)
        assert down.returncode == 0 and down.stdout.strip() == "stopped: worker, prefect, mlflow", (
            down.stdout,
            down.stderr,
        )
        wait_for(lambda: not leftovers(home), 20, "every server process to end after `qabot down`")
    finally:
        kill_leftovers(home)
        cluster.close()
