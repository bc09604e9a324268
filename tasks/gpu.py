"""One training run per GPU: a Prefect global concurrency limit, `qabot-gpu`, one slot per GPU.

A flow run holds one slot from just before it decides whether to train until it ends, or until it pauses for
a reviewer's approval (`gpu_slot`), so two runs started together train one after the other, and the second
decides on retraining only after the first has recorded what it trained. The limit lives in the Prefect server every run reports to, so it serialises
every way of starting a run: deployments through the worker, `qabot run` in a process of its own, and runs
against the ephemeral server of `--no-services` (its database is shared by the processes of one
PREFECT_HOME). A slot is a lease the run renews while it lives: a killed run gives its slot back within the
lease (5 minutes).

`qabot up` creates the limit with `pipeline_lib.devices.gpu_slots()` slots; a run that finds no limit
creates it the same way. An existing limit is left as it is (`prefect gcl update qabot-gpu --limit N`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

GPU_LIMIT = "qabot-gpu"
LEASE_S = 300.0


def ensure_limit(name: str = GPU_LIMIT, slots: int | None = None) -> int:
    """The limit's slot count; creates it with `slots` (default: `devices.gpu_slots()`) when it is missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    from pipeline_lib.devices import gpu_slots

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        n = slots or gpu_slots()
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=n))
        except ObjectAlreadyExists:  # another run created it meanwhile
            return client.read_global_concurrency_limit_by_name(name).limit
        return n


@contextmanager
def gpu_slot(flow_run_id: str | None = None, name: str = GPU_LIMIT) -> Iterator[None]:
    """Hold one slot of `name` while inside; waits, without a deadline, while every slot is held."""
    from uuid import UUID

    from prefect import get_run_logger
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    slots = ensure_limit(name)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run_id)) if flow_run_id else None
    logger.info("taking a slot of %s (%d slot(s)): waits while other runs hold them all", name, slots)
    t0 = time.monotonic()
    with concurrency(
        name,
        occupy=1,
        strict=True,  # a missing limit is an error, never a silent run without one
        lease_duration=LEASE_S,
        holder=holder,
        raise_on_lease_renewal_failure=False,  # a brief API outage must not stop hours of training
    ):
        logger.info("holding a slot of %s (waited %.0f s)", name, time.monotonic() - t0)
        yield
