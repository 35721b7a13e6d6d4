"""Several servers of one model (``--endpoint`` given more than once): which one gets the next
request, and which ones are out for a while.

- **Choice:** the server with the fewest requests outstanding; ties go round-robin, so an idle
  fleet is still spread evenly.
- **Ejection:** a server whose last :data:`EJECT_AFTER` requests all failed on the server's
  side (connection refused or dropped, timeout, 5xx; not a 4xx, which is about the item, nor a
  429, which says the server is up) is left out for a while. When its time is up one request
  (the probe) goes to it: an answer brings it back, a failure leaves it out twice as long (up
  to :data:`MAX_EJECTION`). A fleet of one never ejects anything: there would be nowhere else
  to go, and the throttle's outage gate already paces a server that is down.
- **Nowhere left:** when every server is out, the request goes to the one due back first
  anyway. Then the throttle governs as for a single server (outage gate, ``--max-outage``).
- **Wrong servers:** one that does not look like a classify API at all (see
  :mod:`batchclassify.client`) is out for good, with a warning naming it; only when every
  server of the fleet is wrong does the run stop.

The fleet keeps counts per server (requests, failures, ejections) for the summary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from batchclassify.endpoints import KeyTransport, Upload
from batchclassify.errors import without_userinfo

__all__ = ["EJECT_AFTER", "Endpoint", "Fleet", "Route"]

log = logging.getLogger("batchclassify")

#: failures in a row (none answered between) that take a server out of a fleet
EJECT_AFTER = 5
#: how long a server is out after its first ejection, and the longest it is ever out (seconds)
FIRST_EJECTION = 1.0
MAX_EJECTION = 60.0


@dataclass(frozen=True, slots=True)
class Route:
    """How one server is reached: its URL, how the key goes to it, how the image does."""

    endpoint: str
    key_transport: KeyTransport
    upload: Upload


class Endpoint:
    """One server of a fleet and what the client has seen of it."""

    def __init__(self, route: Route, index: int) -> None:
        self.route = route
        self.index = index
        #: the URL without credentials: what messages and the summary show
        self.label = without_userinfo(route.endpoint).rstrip("/")
        self.outstanding = 0
        self.requests = 0
        self.failures = 0
        self.ejections = 0
        #: answered at least once; signs, before that, that it is no classify API
        self.answered = False
        self.strikes = 0
        #: out for good: it is no classify API
        self.wrong = False
        self.in_a_row = 0
        #: loop time it may be probed again; ``None`` while it is in the fleet
        self.out_until: float | None = None
        self.backoff = FIRST_EJECTION
        self.probing = False

    @property
    def ejected(self) -> bool:
        return self.out_until is not None or self.wrong

    def usage(self) -> dict[str, int]:
        return {"requests": self.requests, "failures": self.failures, "ejections": self.ejections}

    def __repr__(self) -> str:
        return f"Endpoint({self.label!r}, outstanding={self.outstanding})"


class Fleet:
    """The servers of one client; create it inside the running event loop."""

    def __init__(self, routes: Sequence[Route]) -> None:
        if not routes:
            raise ValueError("a fleet needs at least one endpoint")
        self.endpoints = [Endpoint(route, n) for n, route in enumerate(routes)]
        self._loop = asyncio.get_running_loop()
        self._turn = 0

    def __len__(self) -> int:
        return len(self.endpoints)

    def pick(self, avoid: Collection[Endpoint] = ()) -> Endpoint:
        """The server for the next request: a probe that is due first, else the least busy
        server in the fleet, preferring those not in ``avoid`` (the servers this request
        already failed on); with every server out, the one due back first."""
        endpoints = self.endpoints
        if len(endpoints) == 1:
            return endpoints[0]
        now = self._loop.time()
        best: Endpoint | None = None
        best_avoided: Endpoint | None = None
        count = len(endpoints)
        start = self._turn
        for step in range(count):
            endpoint = endpoints[(start + step) % count]
            if endpoint.wrong:
                continue
            out_until = endpoint.out_until
            if out_until is not None:
                if now < out_until or endpoint.probing or endpoint in avoid:
                    continue
                endpoint.probing = True
                log.info("probing %s again", endpoint.label)
                return endpoint
            if endpoint in avoid:
                if best_avoided is None or endpoint.outstanding < best_avoided.outstanding:
                    best_avoided = endpoint
            elif best is None or endpoint.outstanding < best.outstanding:
                best = endpoint
        chosen = best or best_avoided
        if chosen is None:
            chosen = self._due_first()
        self._turn = (chosen.index + 1) % count
        return chosen

    def _due_first(self) -> Endpoint:
        candidates = [e for e in self.endpoints if not e.wrong] or self.endpoints
        return min(candidates, key=lambda e: (e.out_until or 0.0, e.outstanding))

    def succeeded(self, endpoint: Endpoint) -> None:
        endpoint.answered = True
        endpoint.in_a_row = 0
        endpoint.probing = False
        if endpoint.out_until is not None:
            endpoint.out_until = None
            endpoint.backoff = FIRST_EJECTION
            log.warning("%s answers again: back in the fleet", endpoint.label)

    def failed(self, endpoint: Endpoint, reason: str) -> None:
        """A failure on the server's side (no answer, timeout, 5xx)."""
        endpoint.failures += 1
        endpoint.in_a_row += 1
        if len(self.endpoints) == 1 or endpoint.wrong:
            return
        now = self._loop.time()
        if endpoint.probing:
            # The probe failed: out again, for longer.
            endpoint.probing = False
            endpoint.backoff = min(endpoint.backoff * 2, MAX_EJECTION)
            endpoint.out_until = now + endpoint.backoff
            log.info(
                "%s still fails (%s): next probe in %.0f s",
                endpoint.label,
                reason,
                endpoint.backoff,
            )
        elif endpoint.out_until is None and endpoint.in_a_row >= EJECT_AFTER:
            endpoint.out_until = now + endpoint.backoff
            endpoint.ejections += 1
            log.warning(
                "%s failed %d requests in a row (last: %s): left out of the fleet, probed again "
                "in %.0f s",
                endpoint.label,
                endpoint.in_a_row,
                reason,
                endpoint.backoff,
            )

    def released(self, endpoint: Endpoint) -> None:
        """A request to ``endpoint`` ended without an outcome (cancelled, or an item error)."""
        endpoint.probing = False

    def condemn(self, endpoint: Endpoint, why: str) -> bool:
        """``endpoint`` is no classify API: out for good. Returns whether the fleet has a
        server left that may be one."""
        if not endpoint.wrong:
            endpoint.wrong = True
            endpoint.ejections += 1
            if len(self.endpoints) > 1:
                log.warning(
                    "%s is left out of the fleet for the whole run: %s", endpoint.label, why
                )
        return any(not e.wrong for e in self.endpoints)

    def usage(self) -> dict[str, dict[str, int]]:
        """Requests, failures and ejections per server, by label."""
        return {endpoint.label: endpoint.usage() for endpoint in self.endpoints}
