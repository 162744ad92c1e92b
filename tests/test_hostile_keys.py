"""Hostile ids against a real etcd: an id is a key suffix and can never reach another service.

The warm-up reads the range of keys that start with ``/service/<name>/``. An id is appended to
that prefix as it is, so ``../x``, ``/``, NUL or look-alike characters are only strange
suffixes: this property records such ids for one service next to neighbours whose names share
its beginning, then checks every key in etcd and what each service's warm-up and claims see.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svc.config import Settings
from svc.dedup import EtcdStore, Verdict, open_store
from svc.events import InvalidEvent, decode
from tests.hostile_samples import ANY_CHAR, NASTY_IDS
from tests.support import EtcdServer

pytestmark = pytest.mark.etcd

SERVICE = "orders"
# Valid service names that share SERVICE's beginning, or whose prefix sorts right next to it.
NEIGHBOURS = ["order", "orders-x", "orders_", "orders0", "ordersx", "orders-"]

ids_toward_neighbours = st.sampled_from(NEIGHBOURS).map(lambda n: f"../{n}/canary")
hostile_ids = st.lists(
    st.sampled_from(NASTY_IDS) | st.text(ANY_CHAR, min_size=1, max_size=30) | ids_toward_neighbours,
    min_size=1,
    max_size=12,
)


def accepted_ids(candidates: list[str]) -> list[str]:
    """The ids the decoder accepts from events carrying ``candidates``, without repeats."""
    accepted = []
    for candidate in candidates:
        try:
            event = decode(json.dumps({"type": "new_order", "id": candidate}).encode())
        except InvalidEvent:
            continue
        accepted.append(event.id)
    return list(dict.fromkeys(accepted))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A private etcd, so that every key in it can be accounted for."""
    server = EtcdServer(Path(tmp_path_factory.mktemp("etcd-hostile-keys")))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def open_etcd_store(etcd: EtcdServer, service: str) -> EtcdStore:
    host, port = etcd.endpoint.rsplit(":", 1)
    store = open_store(
        Settings(
            service_name=service,
            enable_etcd=True,
            etcd_endpoints=((host, int(port)),),
            etcd_timeout_seconds=5.0,
            claim_ttl_seconds=30,
        )
    )
    assert isinstance(store, EtcdStore)
    return store


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(candidates=hostile_ids)
def test_hostile_ids_stay_keys_of_their_own_service(
    etcd: EtcdServer, candidates: list[str]
) -> None:
    ids = accepted_ids(candidates)
    client = etcd.client()
    client.delete_prefix("/")
    canaries = {name: f"canary-{uuid.uuid4().hex[:6]}" for name in NEIGHBOURS}
    for name, canary in canaries.items():
        neighbour = open_etcd_store(etcd, name)
        neighbour.claim([canary])
        neighbour.record([canary])
        neighbour.close()

    orders = open_etcd_store(etcd, SERVICE)
    try:
        assert orders.claim(ids) == dict.fromkeys(ids, Verdict.NEW)
        orders.record(ids)
    finally:
        orders.close()

    keys = [meta.key for _, meta in client.get_all()]
    ours = [k for k in keys if k.startswith(f"/service/{SERVICE}/".encode())]
    assert sorted(k[len(f"/service/{SERVICE}/") :].decode("utf-8") for k in ours) == sorted(ids)
    others = sorted(set(keys) - set(ours))
    assert others == sorted(f"/service/{n}/{c}".encode() for n, c in canaries.items())

    # What a restarted replica of each service loads, and what it would claim.
    for name, expected in [(SERVICE, set(ids)), *((n, {c}) for n, c in canaries.items())]:
        store = open_etcd_store(etcd, name)
        try:
            assert store.warm_up() == len(expected), name
            assert all(store.is_known(i) for i in expected), name
            if name != SERVICE:
                fresh = [i for i in ids if i != canaries[name]]
                verdicts = store.claim(fresh)
                assert verdicts == dict.fromkeys(fresh, Verdict.NEW), name
                store.release(fresh)
        finally:
            store.close()
