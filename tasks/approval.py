"""A reviewer's yes/no in the Prefect UI before a model becomes champion (`PromotionSettings.approval`).

When the promotion step says "pending", the flow pauses with a form (`PromotionApproval`: the question and
the decision's reason, one checkbox) and hands the answer back to the step as its verdict: "approved",
"refused", or "timed out" when nobody answered in time. A timed-out pause leaves the flow run paused on the
server, and a run that goes on from there ends Failed ("never resumed") however well the rest goes, so the
run is set running again before it goes on with the next model.
"""

from __future__ import annotations

from prefect.input import RunInput
from pydantic import Field

from pipeline_lib.contracts import PromotionResult


class PromotionApproval(RunInput):
    approve: bool = Field(False, description="Make this version the registered model's champion.")


def question(result: PromotionResult) -> str:
    return (
        f"Promote {result.registered_name} version {result.version} ({result.model_name}) to champion? "
        f"{result.reason}"
    )


def verdict(answer: PromotionApproval | None) -> str:
    """The promotion step's verdict for a reviewer's answer (None: no answer in time)."""
    if answer is None:
        return "timed out"
    return "approved" if answer.approve else "refused"


def ask_reviewer(result: PromotionResult, timeout_s: int) -> str:
    """Pause the flow run until a reviewer answers in the Prefect UI or `timeout_s` passes; the verdict."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    form = PromotionApproval.with_initial_data(description=question(result), approve=False)
    try:
        answer = pause_flow_run(
            wait_for_input=form, timeout=timeout_s, key=f"promote-{result.registered_name}-{result.version}"
        )
    except FlowPauseTimeout:
        _resume_after_timeout()
        answer = None
    return verdict(answer)


def _resume_after_timeout() -> None:
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Running

    context = FlowRunContext.get()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(context.flow_run.id, Running(), force=True)
