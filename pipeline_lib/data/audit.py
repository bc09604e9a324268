"""The cleaning audit: per rule, how many rows it repaired or dropped, with a few examples."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline_lib.data.rules import _RULE_DESCRIPTIONS

_EXAMPLES = 3  # examples kept per rule in the audit
_SHOW = 80  # characters of an example shown in the audit


def _show(s: str | None) -> str | None:
    if s is None:
        return None
    text = json.dumps(s, ensure_ascii=False)[1:-1]  # newlines and control characters stay visible
    return text if len(text) <= _SHOW else text[: _SHOW - 1] + "…"


@dataclass
class RuleStats:
    rule: str
    action: str  # "repair" or "drop"
    enabled: bool = True
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Audit:
    """What cleaning did: per rule, how many rows it repaired or dropped, with a few examples.

    `rows_in == rows_out + dropped` always holds."""

    rows_in: int = 0
    rows_out: int = 0
    rules: dict[str, RuleStats] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(s.count for s in self.rules.values() if s.action == "drop")

    @property
    def repaired(self) -> int:
        return sum(s.count for s in self.rules.values() if s.action == "repair")

    def add_rule(self, name: str, action: str, enabled: bool = True) -> None:
        self.rules.setdefault(name, RuleStats(name, action, enabled))

    def record(self, rule: str, row: int, field_: str, before: str | None, after: str | None = None,
               **extra: Any) -> None:  # fmt: skip
        s = self.rules[rule]
        s.count += 1
        if len(s.examples) < _EXAMPLES:
            s.examples.append(
                {"row": row, "field": field_, "before": _show(before), "after": _show(after), **extra}
            )

    def count(self, rule: str) -> int:
        s = self.rules.get(rule)
        return s.count if s else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": self.dropped,
            "repaired": self.repaired,
            "rules": {k: asdict(v) for k, v in self.rules.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Audit:
        return cls(d["rows_in"], d["rows_out"], {k: RuleStats(**v) for k, v in d.get("rules", {}).items()})


def _example_line(ex: Mapping[str, Any]) -> str:
    s = f"row {ex['row']} {ex.get('field', '')}: {ex.get('before')!r}"
    if ex.get("after") is not None:
        s += f" -> {ex['after']!r}"
    if ex.get("reason"):
        s += f" ({ex['reason']})"
    if ex.get("of") is not None:
        s += f" (same as row {ex['of']})"
    return s


def audit_table(audit: Audit | Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per rule (rule, action, count, example, description) for logging as a table."""
    d = audit.to_dict() if isinstance(audit, Audit) else audit
    out = []
    for name, s in d["rules"].items():
        action = s["action"] if s.get("enabled", True) else f"{s['action']} (off)"
        ex = s["examples"][0] if s.get("examples") else None
        out.append({
            "rule": name,
            "action": action,
            "count": s["count"],
            "example": _example_line(ex) if ex else "",
            "description": _RULE_DESCRIPTIONS.get(name, ""),
        })  # fmt: skip
    return out
