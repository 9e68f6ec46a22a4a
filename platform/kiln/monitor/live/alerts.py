"""Alerts: one per threshold crossing (hysteresis), as a log line and an optional webhook POST."""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

logger = logging.getLogger("kiln.monitor")


class AlertState(StrEnum):
    """An alert event's state (str-valued: the webhook JSON holds the plain names)."""

    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass
class Alert:
    """One alert event: ``state`` is 'firing' when ``value`` crossed ``threshold``, 'resolved' when
    it fell back."""

    model: str
    version: str
    signal: str  # drift | ood_rate
    state: str  # firing | resolved
    value: float
    threshold: float
    at: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        extra = (
            f" (drifted: {', '.join(self.details['drifted'])})"
            if self.details.get("drifted")
            else ""
        )
        verb = "above" if self.state == AlertState.FIRING else "back below"
        return (
            f"kiln monitor alert [{self.state}]: model {self.model} version {self.version}: "
            f"{self.signal} "
            f"{self.value:.3f} {verb} {self.threshold:g}{extra}"
        )


class Threshold:
    """Fires once when the value exceeds ``threshold``; re-arms only below ``hysteresis *
    threshold``."""

    def __init__(self, signal: str, threshold: float, hysteresis: float):
        self.signal, self.threshold, self.clear_below = signal, threshold, threshold * hysteresis
        self.firing = False
        self.since: float | None = None  # when it started firing

    def update(self, value: float) -> AlertState | None:
        """The new state on a transition (firing or resolved), else None."""
        if not self.firing and value > self.threshold:
            self.firing, self.since = True, time.time()
            return AlertState.FIRING
        if self.firing and value < self.clear_below:
            self.firing, self.since = False, None
            return AlertState.RESOLVED
        return None


def url_origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL: what may be logged of a secret one."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def post_webhook(url: str, payload: dict[str, Any], timeout: float) -> bool:
    """POST ``payload`` as JSON; False (and a log line) when the receiver fails. Never raises."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
        # an alert receiver that is down or answers nonsense must not break serving
        # the URL's scheme and host only: its path, query or user info may carry a token
        logger.warning("kiln monitor: webhook %s failed: %s", url_origin(url), type(exc).__name__)
        return False


def notify(alert: Alert, webhook_url: str | None, timeout: float) -> None:
    """The alert's log line, then its webhook call (blocking: called off the event loop)."""
    (logger.warning if alert.state == AlertState.FIRING else logger.info)(alert.line())
    if webhook_url:
        post_webhook(webhook_url, {"kind": "kiln.monitor.alert", **alert.to_dict()}, timeout)
