"""What a rollout is asked to do: strategy, steps, bake and gate-interval durations, gates.

Everything here is plain data checked before anything is deployed: a bad option is a KilnError
(one ``error:`` line, exit 2) naming it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from kiln.errors import KilnError


class Strategy(StrEnum):
    """How the candidate takes traffic (str-valued: records and JSON hold the plain names)."""

    CANARY = "canary"
    LINEAR = "linear"
    BLUE_GREEN = "blue-green"
    SHADOW = "shadow"


STRATEGIES = tuple(s.value for s in Strategy)
# Signals a gate may name. ``agreement`` needs mirrored traffic (the shadow strategy). Quality
# signals (issue 8: input drift, out-of-distribution rate) come from
# ``ModelServer.quality_signals``; until a replica reports one, a gate on it has no data and holds
# the step.
# ``restarts``: deaths of replicas while they were answering the candidate, over the whole rollout
# (counted by the controller from the replicas' in-flight files).
LIVE_SIGNALS = ("error_rate", "p50_ms", "p99_ms", "agreement", "restarts")
QUALITY_SIGNALS = ("drift", "ood_rate")
KNOWN_SIGNALS = LIVE_SIGNALS + QUALITY_SIGNALS
DEFAULT_GATES = ("error_rate<0.01",)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_GATE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(<=|>=|<|>)\s*(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)\s*$")


def parse_duration(text: str | float, what: str = "duration") -> float:
    """Seconds from ``500ms``, ``5s``, ``2m``, ``1h`` or a bare number of seconds. Raises
    KilnError."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise KilnError(f"{what} '{text}' is not a duration (e.g. 500ms, 5s, 2m, 1h)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not seconds > 0 or math.isinf(seconds):
        raise KilnError(f"{what} must be positive (got '{text}')")
    return seconds


@dataclass(frozen=True)
class Gate:
    """``signal op threshold``: a step may advance only while it holds (``error_rate<0.01``)."""

    signal: str
    op: str
    threshold: float

    @property
    def expr(self) -> str:
        return f"{self.signal}{self.op}{self.threshold:g}"

    def check(self, value: float | None) -> bool | None:
        """True (holds), False (fails: roll back) or None (no data: the step holds)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return {
            "<": value < self.threshold,
            "<=": value <= self.threshold,
            ">": value > self.threshold,
            ">=": value >= self.threshold,
        }[self.op]


def parse_gate(expr: str) -> Gate:
    """``NAME<X`` / ``NAME>X`` (also ``<=``, ``>=``) on a known signal. Raises KilnError."""
    match = _GATE.match(expr)
    if not match:
        raise KilnError(
            f"gate '{expr}' is not NAME<VALUE or NAME>VALUE (e.g. error_rate<0.01, p99_ms<200, "
            "agreement>0.9)"
        )
    signal, op, threshold = match.group(1), match.group(2), float(match.group(3))
    if signal not in KNOWN_SIGNALS:
        raise KilnError(
            f"gate '{expr}': unknown signal '{signal}' (known: {', '.join(KNOWN_SIGNALS)})"
        )
    return Gate(signal, op, threshold)


@dataclass
class RolloutOptions:
    """How a rollout runs; ``plan(strategy)`` fills the strategy's defaults and checks the rest."""

    weight: float | None = (
        None  # canary: share to the new version; shadow: share mirrored (percent)
    )
    steps: list[float] | None = None  # linear: shares per step (percent, increasing)
    bake_s: float = 60.0  # time at each step before it may advance
    interval_s: float = 5.0  # gate evaluation interval
    gates: list[str] = field(default_factory=lambda: list(DEFAULT_GATES))
    sticky_header: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plan(self, strategy: str) -> tuple[list[float], float, list[Gate]]:
        """(candidate share per step, mirrored share, gates) for ``strategy``. Raises KilnError."""
        if strategy not in STRATEGIES:
            raise KilnError(f"unknown strategy '{strategy}' (known: {', '.join(STRATEGIES)})")
        if self.steps is not None and strategy != Strategy.LINEAR:
            raise KilnError(f"--steps applies to the linear strategy, not {strategy}")
        if self.weight is not None and strategy not in (Strategy.CANARY, Strategy.SHADOW):
            raise KilnError(f"--weight applies to canary and shadow, not {strategy}")
        if self.weight is not None and not 0 < self.weight <= 100:
            raise KilnError(f"--weight must be a percentage in (0, 100] (got {self.weight:g})")
        for value, what in ((self.bake_s, "--bake"), (self.interval_s, "--interval")):
            if not value > 0:
                raise KilnError(f"{what} must be positive")
        gates = [parse_gate(g) for g in self.gates]
        if strategy != Strategy.SHADOW and any(g.signal == "agreement" for g in gates):
            raise KilnError(
                "an 'agreement' gate needs mirrored traffic: use --strategy shadow (canary, linear "
                "and blue-green answer each request with one version, so there is nothing to "
                "compare)"
            )
        if strategy == Strategy.CANARY:
            return [self.weight if self.weight is not None else 5.0], 0.0, gates
        if strategy == Strategy.LINEAR:
            steps = self.steps if self.steps is not None else [10.0, 25.0, 50.0, 100.0]
            if (
                not steps
                or any(not 0 < s <= 100 for s in steps)
                or any(b <= a for a, b in zip(steps, steps[1:], strict=False))
            ):
                raise KilnError(
                    f"--steps must be increasing percentages in (0, 100] (got "
                    f"{','.join(f'{s:g}' for s in steps)})"
                )
            return list(steps), 0.0, gates
        if strategy == Strategy.BLUE_GREEN:
            return [100.0], 0.0, gates
        return [0.0], self.weight if self.weight is not None else 10.0, gates


def options_for(
    strategy: str,
    weight: float | None,
    steps: list[float] | None,
    bake_s: float,
    interval_s: float,
    gates: list[str],
) -> RolloutOptions:
    """The options of a configured rollout policy (``serve.monitor.retrain.rollout``, whose fields
    are these parameters): its weight applies to canary and shadow only, so the policy's default
    weight is dropped for the other strategies."""
    return RolloutOptions(
        weight=weight if strategy in (Strategy.CANARY, Strategy.SHADOW) else None,
        steps=steps,
        bake_s=bake_s,
        interval_s=interval_s,
        gates=list(gates),
    )


def parse_steps(text: str) -> list[float]:
    """``10,25,50,100`` -> [10.0, 25.0, 50.0, 100.0]. Raises KilnError."""
    try:
        return [float(part.strip().rstrip("%")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KilnError(
            f"--steps '{text}' is not a comma-separated list of percentages (e.g. 10,25,50,100)"
        ) from None
