"""statsd counters, sent as UDP packets (several counter lines per packet).

Counters are gathered per batch of deliveries and sent once the batch is acked, so one packet
carries a batch's worth of counts. statsd over UDP may drop packets silently: the counts are
indicators, not records. Metric names are built only from the validated service name and the
fixed suffixes below or a registered handler's type, never from raw event data.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import statsd

log = logging.getLogger(__name__)

# Note: 1,432 bytes keeps a packet inside one Ethernet frame once IP and UDP headers are added;
# statsd reads each line of a packet as its own metric.
MAX_PACKET_BYTES = 1432
# statsd splits a packet at newlines and a line at ':' and '|'; Graphite splits a path at '.'.
# A name outside this set could forge or corrupt a line, so it is never sent.
METRIC_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class Metrics:
    """Counters named ``<service>_<suffix>``; a no-op when the statsd host cannot be resolved."""

    def __init__(self, service: str, host: str, port: int) -> None:
        self.service = service
        self._pending: Counter[str] = Counter()
        self._interval: Counter[str] = Counter()
        self._client: statsd.StatsClient | None
        try:
            self._client = statsd.StatsClient(host, port, maxudpsize=MAX_PACKET_BYTES)
        except (OSError, UnicodeError) as exc:
            log.warning("statsd host %r cannot be resolved (%s): counters are off", host, exc)
            self._client = None

    def count(self, suffix: str, n: int = 1) -> None:
        """Add ``n`` to ``<service>_<suffix>``; sent at the next :meth:`flush`.

        A name that is not a single well-formed statsd name is logged and dropped, never sent.
        """
        name = f"{self.service}_{suffix}"
        if not METRIC_NAME.fullmatch(name):
            log.error("counter name %r is not a safe statsd name; not counted", name[:100])
            return
        self._pending[name] += n

    def announce(self, *suffixes: str) -> None:
        """Send a zero for each counter now, so its series exists before the first event."""
        for suffix in suffixes:
            self._pending[f"{self.service}_{suffix}"] += 0
        self.flush()

    def flush(self) -> None:
        """Send every pending count, packing several lines into each packet."""
        if not self._pending:
            return
        pending, self._pending = self._pending, Counter()
        self._interval.update(pending)
        if self._client is None:
            return
        try:
            with self._client.pipeline() as pipe:
                for name, n in pending.items():
                    pipe.incr(name, n)
        except OSError as exc:
            # A full socket buffer or an ICMP error from the last send: counts are best effort.
            log.debug("statsd send failed: %s", exc)

    def take_interval_counts(self) -> dict[str, int]:
        """The non-zero counts flushed since the last call (for the periodic summary line)."""
        counts, self._interval = self._interval, Counter()
        return {name: n for name, n in counts.items() if n}

    def close(self) -> None:
        self.flush()
        if self._client is not None:
            self._client.close()
