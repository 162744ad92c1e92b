"""The etcd-backed seen-id store against a real etcd: claims, records, releases, warm-up."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from svc.config import Settings
from svc.dedup import EtcdStore, Verdict, open_store
from svc.errors import StoreUnavailable

pytestmark = pytest.mark.etcd


def make_store(endpoint: str, service: str, claim_ttl: int = 30) -> EtcdStore:
    host, port = endpoint.rsplit(":", 1)
    settings = Settings(
        service_name=service,
        enable_etcd=True,
        etcd_endpoints=((host, int(port)),),
        etcd_timeout_seconds=2.0,
        claim_ttl_seconds=claim_ttl,
    )
    store = open_store(settings)
    assert isinstance(store, EtcdStore)
    return store


@pytest.fixture
def service() -> str:
    return f"dedup-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def stores(etcd_server, service: str) -> Iterator[list[EtcdStore]]:
    """Two replicas of one service, closed at the end."""
    made = [make_store(etcd_server.endpoint, service) for _ in range(2)]
    yield made
    for store in made:
        store.close()


def test_first_claim_wins_and_the_other_replica_sees_it_busy(stores: list[EtcdStore]) -> None:
    first, second = stores
    assert first.claim(["a", "b"]) == {"a": Verdict.NEW, "b": Verdict.NEW}
    assert second.claim(["a", "b", "c"]) == {
        "a": Verdict.BUSY,
        "b": Verdict.BUSY,
        "c": Verdict.NEW,
    }


def test_recorded_id_reads_true_and_is_done_for_everyone(
    stores: list[EtcdStore], etcd_server, service: str
) -> None:
    first, second = stores
    first.claim(["42"])
    first.record(["42"])
    value, _ = etcd_server.client().get(f"/service/{service}/42")
    assert value == b"true"
    assert first.is_known("42")
    assert second.claim(["42"]) == {"42": Verdict.DONE}
    assert second.is_known("42")


def test_released_claim_can_be_taken_by_another_replica(stores: list[EtcdStore]) -> None:
    first, second = stores
    first.claim(["x"])
    first.release(["x"])
    assert second.claim(["x"]) == {"x": Verdict.NEW}


def test_release_never_deletes_a_record(stores: list[EtcdStore]) -> None:
    first, second = stores
    first.claim(["r"])
    first.record(["r"])
    second.release(["r"])
    assert second.claim(["r"]) == {"r": Verdict.DONE}


def test_claim_of_a_dead_replica_expires_with_its_lease(etcd_server, service: str) -> None:
    dead = make_store(etcd_server.endpoint, service, claim_ttl=2)
    dead.claim(["orphan"])
    # Simulate a kill -9: stop the keep-alive thread without revoking the lease.
    dead._closing.set()
    survivor = make_store(etcd_server.endpoint, service)
    try:
        assert survivor.claim(["orphan"]) == {"orphan": Verdict.BUSY}
        deadline = time.monotonic() + 20
        verdict = Verdict.BUSY
        while verdict is Verdict.BUSY and time.monotonic() < deadline:
            time.sleep(0.5)
            verdict = survivor.claim(["orphan"])["orphan"]
        assert verdict is Verdict.NEW
    finally:
        survivor.close()


def test_claims_are_kept_alive_beyond_their_ttl(etcd_server, service: str) -> None:
    holder = make_store(etcd_server.endpoint, service, claim_ttl=2)
    other = make_store(etcd_server.endpoint, service)
    try:
        holder.claim(["held"])
        time.sleep(5)  # over two TTLs: only the keep-alive can explain the claim still being there
        assert other.claim(["held"]) == {"held": Verdict.BUSY}
    finally:
        holder.close()
        other.close()


def test_batches_larger_than_etcds_transaction_limit_are_split(stores: list[EtcdStore]) -> None:
    first, second = stores
    ids = [f"id-{n}" for n in range(300)]
    assert set(first.claim(ids).values()) == {Verdict.NEW}
    first.record(ids[:150])
    verdicts = second.claim(ids + ["fresh"])
    assert [verdicts[i] for i in ids[:150]] == [Verdict.DONE] * 150
    assert [verdicts[i] for i in ids[150:]] == [Verdict.BUSY] * 150
    assert verdicts["fresh"] is Verdict.NEW


def test_warm_up_loads_finished_ids_only(
    stores: list[EtcdStore], etcd_server, service: str
) -> None:
    first, _ = stores
    first.claim(["done-1", "done-2", "in-flight"])
    first.record(["done-1", "done-2"])
    fresh = make_store(etcd_server.endpoint, service)
    try:
        assert fresh.warm_up() == 2
        assert fresh.is_known("done-1") and fresh.is_known("done-2")
        assert not fresh.is_known("in-flight")
    finally:
        fresh.close()


def test_path_like_ids_stay_under_the_service_prefix(
    stores: list[EtcdStore], etcd_server, service: str
) -> None:
    first, _ = stores
    first.claim(["../escape", "/"])
    first.record(["../escape", "/"])
    keys = sorted(meta.key for _, meta in etcd_server.client().get_prefix(f"/service/{service}/"))
    assert keys == [f"/service/{service}/../escape".encode(), f"/service/{service}//".encode()]


def test_unreachable_etcd_raises_store_unavailable(service: str) -> None:
    store = make_store("127.0.0.1:9", service)  # nothing listens on the discard port
    try:
        with pytest.raises(StoreUnavailable):
            store.claim(["a"])
    finally:
        store.close()


def test_warm_up_of_many_ids_reads_every_one_exactly(etcd_server, service: str) -> None:
    """Past a page the warm-up reads counted sub-ranges in parallel; none may be missed or
    invented, whatever the ids' first characters, non-ASCII ones included."""
    ids = [f"{lead}{n:05d}" for n in range(9_000) for lead in ("a", "Z", "7", "é", "~")]
    ids += [f"x{n}" for n in range(40_000)]  # one crowded sub-range, cut again deeper
    writer = etcd_server.client()
    ops = writer.transactions
    for start in range(0, len(ids), 128):
        puts = [ops.put(f"/service/{service}/{i}", "true") for i in ids[start : start + 128]]
        writer.transaction(compare=[], success=puts, failure=[])
    store = make_store(etcd_server.endpoint, service)
    try:
        assert store.warm_up() == len(ids)
        assert all(store.is_known(i) for i in ids)
    finally:
        store.close()
