"""Promotion through the model registry's aliases: `promote_stage(job) -> PromotionResult`.

After a model's answers, the registered version of its merged model gets the alias `challenger` and its
scores as version tags (`question_score`, held-out `bits_per_byte`). It takes the alias `champion` when
`decide` says so: its question score is at least the champion's and its bits per byte are not higher than the
champion's by more than `PromotionSettings.bpb_margin` (the champion's scores are read from its own version
tags); the first version of a model becomes champion. The decision and its reason, with the numbers of both
sides, are tags on the version (`qabot.promotion`, `qabot.promotion_reason`) and on the model's run.

`decide` is pure (scores in, decision out); the stage reads the registry, decides and applies. A reviewer's
yes/no (`PromotionSettings.approval`) is asked for by the caller, between two calls: the first returns
"pending" (only `challenger` moves), the second carries the reviewer's `verdict` and applies it. A version
that already is champion (a rerun whose merge came from the cache) is "unchanged": nothing is written.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from pipeline_lib.config import PromotionSettings
from pipeline_lib.contracts import PromotionResult
from pipeline_lib.tracking import TrackingTarget, make_tracker

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_DECISION = "qabot.promotion"
TAG_REASON = "qabot.promotion_reason"
TAG_VERSION = "qabot.promotion_version"  # on the run: which version the decision is about

Verdict = Literal["approved", "refused", "timed out"]


class Scores(BaseModel):
    """One registered version's numbers, as compared."""

    model_config = ConfigDict(frozen=True)

    version: str
    question_score: float | None
    bits_per_byte: float | None

    @field_validator("question_score", "bits_per_byte")
    @classmethod
    def _known(cls, v: float | None) -> float | None:
        return None if v is None or math.isnan(v) else v

    @classmethod
    def from_tags(cls, version: str, tags: dict[str, str]) -> Scores:
        return cls(
            version=version,
            question_score=_number(tags.get("question_score")),
            bits_per_byte=_number(tags.get("bits_per_byte")),
        )

    def tags(self) -> dict[str, str]:
        return {
            k: repr(v)
            for k, v in (("question_score", self.question_score), ("bits_per_byte", self.bits_per_byte))
            if v is not None
        }


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    decision: Literal["promoted", "refused", "unchanged", "pending"]
    reason: str


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def compare(candidate: Scores, champion: Scores, margin: float) -> tuple[bool, str]:
    """(whether `candidate` may replace `champion`, the reason with both sides' numbers)."""
    c, ch = candidate, champion
    missing = [
        f"{who} {key.replace('_', ' ')}"
        for who, s in (("challenger's", c), (f"champion (version {ch.version})'s", ch))
        for key in ("question_score", "bits_per_byte")
        if getattr(s, key) is None
    ]
    if missing:
        return False, "cannot compare, unknown: " + ", ".join(missing)
    score_ok = c.question_score >= ch.question_score
    bpb_ok = c.bits_per_byte <= ch.bits_per_byte + margin
    return score_ok and bpb_ok, (
        f"question score {c.question_score:.4f} {'>=' if score_ok else '<'} champion (version {ch.version}) "
        f"{ch.question_score:.4f}; held-out bits per byte {c.bits_per_byte:.4f} vs {ch.bits_per_byte:.4f}, "
        f"{'within' if bpb_ok else 'beyond'} the margin of {margin}"
    )


def decide(
    candidate: Scores,
    champion: Scores | None,
    settings: PromotionSettings,
    verdict: Verdict | None = None,
) -> Decision:
    """Whether `candidate` becomes champion. With `settings.approval`, a candidate that qualifies is
    "pending" until a reviewer's `verdict`: "approved" promotes it, "refused" or "timed out" does not."""
    if champion is None:
        ok, reason = True, "first version: no champion yet"
    elif champion.version == candidate.version:
        return Decision(decision="unchanged", reason=f"version {candidate.version} is already champion")
    else:
        ok, reason = compare(candidate, champion, settings.bpb_margin)
    if not ok:
        return Decision(decision="refused", reason=reason)
    if not settings.approval:
        return Decision(decision="promoted", reason=reason)
    if verdict is None:
        return Decision(decision="pending", reason=f"waiting for a reviewer; {reason}")
    if verdict == "approved":
        return Decision(decision="promoted", reason=f"approved by reviewer; {reason}")
    if verdict == "refused":
        return Decision(decision="refused", reason=f"refused by reviewer; {reason}")
    return Decision(decision="refused", reason=f"approval timed out; {reason}")


class PromoteJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    registered_name: str | None  # the registered model (None: nothing registered, nothing to judge)
    version: str | None  # the merged model's registered version
    question_score: float | None  # its answers' question score
    bits_per_byte: float | None  # its held-out bits per byte (training)
    run_id: str | None = None  # the model's run: the decision is recorded there too
    settings: PromotionSettings = PromotionSettings()
    tracking: TrackingTarget = TrackingTarget(uri=None, experiment="qabot")
    verdict: Verdict | None = None  # the reviewer's answer, when one was asked

    @field_validator("version", mode="before")
    @classmethod
    def _text(cls, v: object) -> str | None:
        return None if v is None else str(v)


def _skipped(job: PromoteJob) -> str | None:
    if not job.settings.enabled:
        return "promotion is switched off (promotion.enabled)"
    if not job.tracking.enabled:
        return "tracking is off: there is no model registry"
    if not job.registered_name or job.version is None:
        return "the merged model was not registered (tracking.register_models, tracking.log_merged_model)"
    return None


def promote_stage(job: PromoteJob) -> PromotionResult:
    """Judge the job's version against the champion (`decide`), move the aliases, record why."""
    candidate = Scores(
        version=job.version or "", question_score=job.question_score, bits_per_byte=job.bits_per_byte
    )
    out = {
        "model_name": job.model_name,
        "registered_name": job.registered_name,
        "version": job.version,
        "question_score": candidate.question_score,
        "bits_per_byte": candidate.bits_per_byte,
    }
    skipped = _skipped(job)
    if skipped:
        return PromotionResult(**out, decision="skipped", reason=skipped)
    tracker = make_tracker(job.tracking)
    name, version = job.registered_name, job.version
    if tracker.version_tags(name, version) is None:
        reason = f"version {version} of {name} is not in the registry at {job.tracking.uri}"
        return PromotionResult(**out, decision="skipped", reason=reason)
    previous = tracker.get_alias_version(name, CHAMPION)
    champion = None
    if previous is not None:
        champion = Scores.from_tags(previous, tracker.version_tags(name, previous) or {})
    decision = decide(candidate, champion, job.settings, job.verdict)
    if decision.decision != "unchanged":
        record = {TAG_DECISION: decision.decision, TAG_REASON: decision.reason}
        tracker.set_version_tags(name, version, {**candidate.tags(), **record})
        tracker.set_alias(name, CHALLENGER, version)
        if decision.decision == "promoted":
            tracker.set_alias(name, CHAMPION, version)
        if job.run_id:
            tracker.set_tags(job.run_id, {**record, TAG_VERSION: f"{name}/{version}"})
    now = version if decision.decision == "promoted" else previous
    return PromotionResult(
        **out, decision=decision.decision, reason=decision.reason, champion=now, previous_champion=previous
    )
