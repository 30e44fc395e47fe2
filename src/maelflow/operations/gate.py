"""The gate: does a candidate's evaluation earn it a model version? A pure decision, with reasons.

Every rule of the model's gate is checked against the candidate's scores (a missing score fails its
rule: a gate never passes on what was not measured), then, where the model has a champion (the
version its champion alias names) and a ``champion_margin`` is configured, the candidate must
beat the champion's ``champion_metric`` (nrmse, or an application's loss; lower is better),
measured on the same dates, by that fraction. A champion that could not
be scored fails the gate too: nothing replaces a version that cannot be compared with it. The
reasons are written for the suite's label ("refused: nrmse 0.61 > max 0.5; ...").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maelflow.config.models import Gate


@dataclass
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)   # why it failed (empty when it passed)
    checks: list[str] = field(default_factory=list)    # every check, as text
    champion: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        if self.passed:
            return "passed: " + "; ".join(self.checks) if self.checks else "passed (no rule configured)"
        return "refused: " + "; ".join(self.reasons)

    def to_json(self) -> dict:
        return {"decision": "passed" if self.passed else "refused", "reasons": self.reasons, "checks": self.checks,
                "champion": self.champion}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def decide(gate: Gate, summary: dict[str, float], champion: dict[str, Any] | None = None) -> Decision:
    """``summary``: the candidate's flat scores; ``champion``: ``{"version", "summary"}`` or
    ``{"version", "error"}`` when the champion alias names a version, None when it names none."""
    reasons: list[str] = []
    checks: list[str] = []
    for rule in gate.rules:
        value = summary.get(rule.metric)
        if value is None:
            reasons.append(f"{rule.metric} was not measured (known: {', '.join(sorted(summary)) or 'none'})")
            continue
        if rule.min is not None:
            ok = value >= rule.min
            (checks if ok else reasons).append(f"{rule.metric} {_fmt(value)} {'>=' if ok else '<'} min {_fmt(rule.min)}")
            if ok and rule.max is None:
                continue
        if rule.max is not None:
            ok = value <= rule.max
            (checks if ok else reasons).append(f"{rule.metric} {_fmt(value)} {'<=' if ok else '>'} max {_fmt(rule.max)}")
    if champion is not None and gate.champion_margin is not None:
        metric = gate.champion_metric   # lower is better (nrmse, or an application's loss)
        version = champion.get("version")
        theirs = (champion.get("summary") or {}).get(metric)
        ours = summary.get(metric)
        if champion.get("error") or theirs is None:
            reasons.append(f"the champion v{version} ({gate.champion_alias}) could not be scored: "
                           f"{champion.get('error') or 'no ' + metric}")
        elif ours is None:
            reasons.append(f"{metric} was not measured, so the candidate cannot be compared with the champion")
        else:
            bar = theirs * (1 - gate.champion_margin) if theirs >= 0 else theirs * (1 + gate.champion_margin)
            text = (f"{metric} {_fmt(ours)} vs champion v{version} {_fmt(theirs)}"
                    + (f" (margin {gate.champion_margin:g})" if gate.champion_margin else ""))
            if ours < bar:
                checks.append(text + ": better")
            else:
                reasons.append(text + ": not better")
    return Decision(passed=not reasons, reasons=reasons, checks=checks, champion=champion)
