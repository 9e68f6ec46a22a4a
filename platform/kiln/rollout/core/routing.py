"""The routing table a ModelServer replica follows, and the per-request choice (no extra hop).

Shares: without a sticky key, each replica spreads requests with a golden-ratio (Weyl) sequence:
over any n requests the candidate's share is within about 1/n of its weight, with no randomness
to average out. With a sticky header, a stable hash of the header's value gives the key a bucket in
[0, 100), and the key goes to the candidate while ``bucket < weight``. The same key lands in the
same bucket on every replica, and as the weight only grows during a ramp, a key moves from the
stable version to the candidate at most once.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

_GOLDEN = 0.6180339887498949


def sticky_bucket(key: str) -> float:
    """The key's bucket in [0, 100), two decimals: the same on every replica and every run."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % 10_000) / 100.0


@dataclass
class RoutingTable:
    """Where unversioned requests go: ``weight`` percent to ``candidate``, the rest to ``stable``;
    ``shadow`` percent of them also mirrored to the candidate. ``versions`` (version -> registry
    URI) are the versions every replica must have loaded."""

    stable: str
    candidate: str | None = None
    weight: float = 0.0
    shadow: float = 0.0
    sticky_header: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    revision: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RoutingTable | None:
        return cls(**data) if data else None


class Router:
    """A replica's choice per request (state: the Weyl sequences' positions)."""

    def __init__(self):
        self._split = 0.0
        self._mirror = 0.0

    def choose(self, table: RoutingTable, sticky_key: str | None) -> str:
        if table.candidate is None or table.weight <= 0:
            return table.stable
        if table.weight >= 100:
            return table.candidate
        if sticky_key is not None:
            point = sticky_bucket(sticky_key)
        else:
            self._split = (self._split + _GOLDEN) % 1.0
            point = self._split * 100.0
        return table.candidate if point < table.weight else table.stable

    def mirror(self, table: RoutingTable) -> bool:
        """Whether this request (answered by the stable version) is also sent to the candidate."""
        if table.candidate is None or table.shadow <= 0:
            return False
        self._mirror = (self._mirror + _GOLDEN) % 1.0
        return self._mirror * 100.0 < table.shadow
