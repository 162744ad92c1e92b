"""Reading counter totals back from Graphite's render API (``/render?format=json``).

statsd's Graphite backend writes one point per flush under ``stats_counts.<name>``: the count
in that flush interval. The total of a counter over a time window is the sum of its points.
Used by ``python -m svc.demo`` to print what Graphite shows, and by the tests of the stack.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable

COUNTS_PREFIX = "stats_counts."
REQUEST_TIMEOUT_SECONDS = 5.0


class GraphiteError(Exception):
    """Graphite did not answer, or answered something that is not a render result."""


def render_url(base_url: str, targets: Iterable[str], since: str, **params: str) -> str:
    """The render API URL of ``targets`` from ``since`` (``-10min`` or epoch seconds) to now."""
    query = [("target", target) for target in targets]
    query += [("from", since), *params.items()]
    return f"{base_url.rstrip('/')}/render?{urllib.parse.urlencode(query)}"


def answers(base_url: str) -> bool:
    """Whether a graphite-web answers at ``base_url`` (its metric finder returns JSON)."""
    url = f"{base_url.rstrip('/')}/metrics/find?query=*&format=treejson"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            json.load(response)
            return True
    except (OSError, ValueError):
        return False


def counter_totals(base_url: str, names: Iterable[str], since_epoch: float) -> Counter[str]:
    """Sum of ``stats_counts.<name>`` points after ``since_epoch``, for each name.

    A name Graphite has no series for (nothing was counted yet) totals 0. Points still in
    carbon's cache are included: graphite-web asks carbon for them (CARBONLINK_HOSTS).
    """
    names = list(names)
    # Graphite returns points strictly after `from`; one second earlier keeps that second's.
    url = render_url(
        base_url,
        (COUNTS_PREFIX + name for name in names),
        str(int(since_epoch) - 1),
        until=str(int(time.time()) + 60),
        format="json",
    )
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            series = json.load(response)
    except (OSError, ValueError) as exc:
        raise GraphiteError(f"render API at {base_url} failed: {exc}") from None
    totals: Counter[str] = Counter({name: 0 for name in names})
    try:
        for one in series:
            name = one["target"].removeprefix(COUNTS_PREFIX)
            totals[name] = round(sum(value for value, _ts in one["datapoints"] if value))
    except (TypeError, KeyError, ValueError) as exc:
        raise GraphiteError(f"unexpected render result from {base_url}: {exc!r}") from None
    return totals
