"""The seen-id store: which event ids were handled already, shared by every replica via etcd.

Key layout, shared with the Go demo: ``/service/<name>/<id>``. The value ``true`` means the id
was handled and recorded. While one replica handles an id, the key holds that replica's claim
token under an etcd lease the replica keeps alive; when the replica dies, the lease expires,
the claim vanishes and the redelivered event is handled by whoever gets it next.

What a crash can cost: a replica killed after its handler ran but before :meth:`record`
returned leaves a claim that expires, so that event is handled a second time. Every other
crash point costs nothing: an unrecorded event is never acked, and a recorded one is skipped.

All calls are batched: one transaction claims up to ``MAX_TXN_OPS`` ids, one records them.

Bounded state (``DEDUP_TTL``): records then carry a lease shared by every id recorded in the
same time bucket (a tenth of the TTL, at least a second), so a handful of leases cover any
number of ids; a record vanishes at least one TTL and at most one TTL plus one bucket after it
was written, and the in-memory set forgets it then too. After that the id counts as new again.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd.exceptions import Etcd3Exception, NoServerAvailableError

from svc import warmup
from svc.errors import StoreRefused, StoreUnavailable
from svc.tls import grpc_credentials

if TYPE_CHECKING:
    from svc.config import Settings

log = logging.getLogger(__name__)

DONE_VALUE = b"true"
_EQUAL = etcdrpc.Compare.EQUAL
_VERSION = etcdrpc.Compare.VERSION
# Note: etcd refuses a transaction with more than 128 compares or operations (--max-txn-ops).
MAX_TXN_OPS = 128
# Note: a warm-up page of 10,000 keys of up to 256 characters nears gRPC's default 4 MiB cap.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# How soon a failed endpoint is tried again; pyetcd's own default is five minutes.
ENDPOINT_RETRY_SECONDS = 1.0
# Answers that no retry with the same credentials or certificates can change.
REFUSED_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,  # "authentication failed, invalid user ID or password"
    grpc.StatusCode.PERMISSION_DENIED,  # the user's roles do not cover /service/
    grpc.StatusCode.UNAUTHENTICATED,  # a token etcd no longer knows, after one new one failed
    grpc.StatusCode.FAILED_PRECONDITION,  # "authentication is not enabled"
)

T = TypeVar("T")


class Verdict(enum.Enum):
    """The outcome of claiming one id."""

    NEW = "new"  #: claimed by this process: handle it, then record it
    DONE = "done"  #: handled before (here or elsewhere): skip it
    BUSY = "busy"  #: claimed by another live replica: hold the delivery and ask again later


class DedupStore(Protocol):
    def warm_up(self) -> int: ...
    def is_known(self, event_id: str) -> bool: ...
    def claim(self, event_ids: Sequence[str]) -> dict[str, Verdict]: ...
    def record(self, event_ids: Sequence[str]) -> None: ...
    def release(self, event_ids: Sequence[str]) -> None: ...
    def close(self) -> None: ...


class DisabledStore:
    """De-duplication off (the demo's default): every event is new, nothing is remembered."""

    def warm_up(self) -> int:
        return 0

    def is_known(self, event_id: str) -> bool:
        return False

    def claim(self, event_ids: Sequence[str]) -> dict[str, Verdict]:
        return dict.fromkeys(event_ids, Verdict.NEW)

    def record(self, event_ids: Sequence[str]) -> None:
        pass

    def release(self, event_ids: Sequence[str]) -> None:
        pass

    def close(self) -> None:
        pass


class EtcdStore:
    """An in-memory set of finished ids, backed by claims and records in etcd.

    Every etcd call has the client's timeout; any failure to get an answer raises
    :class:`StoreUnavailable`, after which the caller must not ack the deliveries concerned.
    """

    def __init__(
        self,
        client: pyetcd.MultiEndpointEtcd3Client,
        service: str,
        claim_ttl: int,
        record_ttl: int | None = None,
    ) -> None:
        self._client = client
        self._record_ttl = record_ttl
        self._bucket_seconds = max(1, (record_ttl or 0) // 10)
        self._record_leases: dict[int, int] = {}  # time bucket -> lease id
        self._record_lease_expiry = 0.0
        # (monotonic time the records expire, their ids), oldest first. The consuming thread
        # (is_known) and the claim thread (claim) both forget expired ids: one at a time.
        self._expiries: deque[tuple[float, list[str]]] = deque()
        self._forgetting = threading.Lock()
        self._prefix = f"/service/{service}/"
        self._prefix_bytes = self._prefix.encode()
        self._claim_ttl = claim_ttl
        self._token = f"claimed-by:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._seen: set[str] = set()
        self._lease: pyetcd.Lease | None = None
        self._lease_lock = threading.Lock()
        self._closing = threading.Event()
        # The kind of error the last endpoint failed with, and where and why
        self._last_failure: tuple[type[StoreUnavailable], str] | None = None
        self._keeper = threading.Thread(target=self._keep_lease_alive, daemon=True)
        self._keeper.start()

    def key(self, event_id: str) -> str:
        # etcd keys are opaque bytes: "../x" stays a literal suffix under the prefix.
        return self._prefix + event_id

    def _key_bytes(self, event_id: str) -> bytes:
        # Decoding rejected lone surrogates, so every id encodes.
        return self._prefix_bytes + event_id.encode()

    def is_known(self, event_id: str) -> bool:
        if self._expiries and self._expiries[0][0] <= time.monotonic():
            self._forget_expired()
        return event_id in self._seen

    def warm_up(self) -> int:
        """Load every finished id under the prefix into memory, in pages of at most 10,000.

        Every read names the revision of the first, so together they form one snapshot; see
        svc/warmup.py for how the rest of the prefix is cut into ranges.
        """
        started = time.monotonic()
        prefix = self._prefix.encode()
        expiring: dict[int, list[str]] = {}  # record lease id -> ids it carries
        first = self._read_page(prefix, warmup.prefix_end(prefix), None, expiring)
        revision = first.header.revision
        warmup.read_rest(
            prefix,
            first,
            read_page=lambda low, high: self._read_page(low, high, revision, expiring),
            count=lambda ranges: self._count_keys(ranges, revision),
        )
        self._schedule_forgetting(expiring)
        log.info(
            "warmed up %d ids from etcd in %.2f s", len(self._seen), time.monotonic() - started
        )
        return len(self._seen)

    def _count_keys(self, ranges: Sequence[tuple[bytes, bytes]], revision: int) -> list[int]:
        """How many keys each range holds at ``revision``: count-only reads, many per request."""
        counts: list[int] = []
        for chunk in _chunks(ranges, MAX_TXN_OPS):
            reads = [
                etcdrpc.RequestOp(
                    request_range=etcdrpc.RangeRequest(
                        key=low,
                        range_end=high,
                        revision=revision,
                        count_only=True,
                        # Any member may answer for a fixed revision: no consensus round trip.
                        serializable=True,
                    )
                )
                for low, high in chunk
            ]
            reply = self._txn("warm-up count", etcdrpc.TxnRequest(success=reads))
            counts.extend(r.response_range.count for r in reply.responses)
        return counts

    def _read_page(
        self, start: bytes, end: bytes, revision: int | None, expiring: dict[int, list[str]]
    ) -> Any:
        page = self._call(
            "warm-up read",
            self._client.get_range_response,
            start,
            end,
            limit=warmup.PAGE_KEYS,
            revision=revision,
            # Once the first page fixed the revision, any member may serve the rest of it
            # without a consensus round trip per page.
            serializable=revision is not None,
        )
        skip = len(self._prefix.encode())
        for kv in page.kvs:
            if _is_finished(kv.value, kv.lease):
                event_id = kv.key[skip:].decode("utf-8", "surrogateescape")
                self._seen.add(event_id)
                if kv.lease:
                    expiring.setdefault(kv.lease, []).append(event_id)
        return page

    def claim(self, event_ids: Sequence[str]) -> dict[str, Verdict]:
        """Claim each id for this process, in as few transactions as etcd allows."""
        self._forget_expired()
        verdicts: dict[str, Verdict] = {}
        for chunk in _chunks(event_ids, MAX_TXN_OPS):
            verdicts.update(self._claim_chunk(chunk))
        for event_id, verdict in verdicts.items():
            if verdict is Verdict.DONE:
                self._seen.add(event_id)
        return verdicts

    def _claim_chunk(self, event_ids: Sequence[str]) -> dict[str, Verdict]:
        verdicts: dict[str, Verdict] = {}
        remaining = list(event_ids)
        token = self._token.encode()
        while remaining:
            lease = self._current_lease()
            keys = [self._key_bytes(i) for i in remaining]
            request = etcdrpc.TxnRequest(
                # version == 0: the key does not exist, so nobody claimed or finished the id.
                compare=[
                    etcdrpc.Compare(key=k, result=_EQUAL, target=_VERSION, version=0) for k in keys
                ],
                success=[
                    etcdrpc.RequestOp(
                        request_put=etcdrpc.PutRequest(key=k, value=token, lease=lease)
                    )
                    for k in keys
                ],
            )
            if self._txn("claim", request).succeeded:
                verdicts.update(dict.fromkeys(remaining, Verdict.NEW))
                break
            # Some ids exist: read them all back in one round trip. Not as the claim's failure
            # branch: etcd writes a transaction's every branch to its log, so each claim would.
            reads = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=k)) for k in keys]
            reply = self._txn("claim read-back", etcdrpc.TxnRequest(success=reads))
            absent = []
            for event_id, response in zip(remaining, reply.responses, strict=True):
                found = response.response_range.kvs
                if not found:
                    absent.append(event_id)  # gone since the compare, or never there: try again
                    continue
                value, lease_id = found[0].value, found[0].lease
                if value == token:
                    verdicts[event_id] = Verdict.NEW  # ours, from before a reconnect
                elif _is_finished(value, lease_id):
                    verdicts[event_id] = Verdict.DONE
                else:
                    verdicts[event_id] = Verdict.BUSY
            remaining = absent
        return verdicts

    def record(self, event_ids: Sequence[str]) -> None:
        """Mark ids as finished: value ``true`` with no lease, so the record outlives us."""
        lease, expires_at = self._record_lease() if self._record_ttl else (0, 0.0)
        for chunk in _chunks(event_ids, MAX_TXN_OPS):
            puts = [
                etcdrpc.RequestOp(
                    request_put=etcdrpc.PutRequest(
                        key=self._key_bytes(i), value=DONE_VALUE, lease=lease
                    )
                )
                for i in chunk
            ]
            self._txn("record", etcdrpc.TxnRequest(success=puts))
        self._seen.update(event_ids)
        if lease:
            self._expiries.append((expires_at, list(event_ids)))

    def _record_lease(self) -> tuple[int, float]:
        """The lease of the current time bucket, and when (monotonic) it expires."""
        assert self._record_ttl is not None
        bucket = int(time.time() // self._bucket_seconds)
        ttl = self._record_ttl + self._bucket_seconds
        if bucket not in self._record_leases:
            lease = self._call("lease grant", self._client.lease, ttl)
            self._record_leases = {bucket: lease.id}  # older buckets' leases run out by themselves
            self._record_lease_expiry = time.monotonic() + ttl
        return self._record_leases[bucket], self._record_lease_expiry

    def _schedule_forgetting(self, expiring: dict[int, list[str]]) -> None:
        """Ask etcd how long each record lease found at warm-up lives, and plan to forget."""
        now = time.monotonic()
        planned = []
        for lease_id, ids in expiring.items():
            info = self._call("lease lookup", self._client.get_lease_info, lease_id)
            if info.TTL <= 0:
                self._seen.difference_update(ids)  # expired while we were reading
            else:
                planned.append((now + info.TTL, ids))
        self._expiries.extend(sorted(planned, key=lambda item: item[0]))

    def _forget_expired(self) -> None:
        now = time.monotonic()
        with self._forgetting:
            while self._expiries and self._expiries[0][0] <= now:
                _, ids = self._expiries.popleft()
                self._seen.difference_update(ids)

    def release(self, event_ids: Sequence[str]) -> None:
        """Drop this process's claims on ids it gave up on, so no one waits for them."""
        txn = self._client.transactions
        for event_id in event_ids:
            key = self.key(event_id)
            self._call(
                "release",
                self._client.transaction,
                # Delete only our own claim, never a record or another replica's claim.
                compare=[txn.value(key) == self._token],
                success=[txn.delete(key)],
                failure=[],
            )

    def close(self) -> None:
        self._closing.set()
        self._keeper.join(timeout=2)
        with self._lease_lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            try:
                # Our claims vanish at once instead of after the TTL: the next holder need not wait.
                self._client.revoke_lease(lease.id)
            except (Etcd3Exception, grpc.RpcError):
                pass
        self._client.close()

    def _current_lease(self) -> int:
        with self._lease_lock:
            if self._lease is None:
                self._lease = self._call("lease grant", self._client.lease, self._claim_ttl)
            return self._lease.id

    def _keep_lease_alive(self) -> None:
        """Refresh the claim lease three times per TTL; forget it if etcd says it expired."""
        interval = self._claim_ttl / 3
        while not self._closing.wait(interval):
            with self._lease_lock:
                lease = self._lease
            if lease is None:
                continue
            try:
                replies = self._call("lease refresh", _refresh, self._client, lease.id)
            except StoreUnavailable as exc:
                log.warning("could not refresh the claim lease: %s", exc)
                continue
            if not replies or replies[0].TTL <= 0:
                # Claims under it are gone: another replica may now take an event this one
                # is still handling or has not yet recorded (README, guarantee 3).
                log.error(
                    "claim lease %x expired (etcd out of reach for longer than DEDUP_CLAIM_TTL?):"
                    " events claimed under it may be handled by another replica too; a new lease "
                    "is taken at the next claim",
                    lease.id,
                )
                with self._lease_lock:
                    if self._lease is lease:
                        self._lease = None

    def _txn(self, what: str, request: Any) -> Any:
        """Send a transaction built as protobuf messages; cheaper than pyetcd's op objects."""
        client = self._client

        def send() -> Any:
            try:
                return client.kvstub.Txn(
                    request,
                    client.timeout,
                    credentials=client.call_credentials,
                    metadata=client.metadata,
                )
            except grpc.RpcError as exc:
                # As pyetcd's own calls do: mark the endpoint failed (failover) and raise its
                # exception for the code.
                client._manage_grpc_errors(exc)
                raise

        return self._call(what, send)

    def _call(self, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one etcd call; with authentication on, take a new token when etcd lost ours."""
        client = self._client
        for attempt in (1, 2):
            step = what
            try:
                if isinstance(client, AuthenticatingClient):
                    step = f"login as {client.user}"
                    client.ensure_token()
                    step = what
                return call(*args, **kwargs)
            except (Etcd3Exception, grpc.RpcError) as exc:
                # Note: etcd keeps simple tokens in memory only: after its restart, or once a
                # token went unused for --auth-token-ttl, every call fails until we log in
                # again. https://etcd.io/docs/v3.5/op-guide/authentication/authentication/
                if attempt == 1 and isinstance(client, AuthenticatingClient) and _is_stale(exc):
                    client.forget_token()
                    continue
                raise self._failure(step, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _failure(self, step: str, exc: BaseException) -> StoreUnavailable:
        """The error to raise for a failed call, naming the endpoint and what to check."""
        if isinstance(exc, NoServerAvailableError) and self._last_failure is not None:
            # Every endpoint failed within ENDPOINT_RETRY_SECONDS: repeat why the last one did,
            # so a refused certificate is not hidden behind "no endpoint available".
            kind, detail = self._last_failure
            return kind(
                f"etcd {step} failed: every endpoint failed in the last "
                f"{ENDPOINT_RETRY_SECONDS:g} s, the last one {detail}"
            )
        where = _endpoint_name(self._client)
        failure: StoreUnavailable
        if _is_refusal(exc):
            if _is_auth_error(exc):
                hint = "check ETCD_USER and ETCD_PASSWORD"
            else:
                hint = "check ETCD_CA_FILE, ETCD_CERT_FILE and ETCD_KEY_FILE"
            detail = f"refused by {where}: {_describe(exc)} ({hint})"
            failure = StoreRefused(f"etcd {step} {detail}")
        else:
            detail = f"at {where}: {_describe(exc)}"
            failure = StoreUnavailable(f"etcd {step} failed {detail}")
        self._last_failure = (type(failure), detail)
        return failure


def open_store(settings: Settings) -> DedupStore:
    """The store the settings ask for: etcd-backed, or disabled."""
    if not settings.enable_etcd:
        return DisabledStore()
    credentials = grpc_credentials(settings.etcd_tls) if settings.etcd_secure else None
    endpoints = [
        pyetcd.Endpoint(
            host,
            port,
            secure=settings.etcd_secure,
            creds=credentials,
            time_retry=ENDPOINT_RETRY_SECONDS,
            opts=[
                ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                # gRPC's reconnect backoff grows to two minutes by default; etcd restarts faster.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        for host, port in settings.etcd_endpoints
    ]
    client: pyetcd.MultiEndpointEtcd3Client
    if settings.etcd_user and settings.etcd_password:
        client = AuthenticatingClient(
            endpoints, settings.etcd_timeout_seconds, settings.etcd_user, settings.etcd_password
        )
    else:
        client = pyetcd.MultiEndpointEtcd3Client(
            endpoints=endpoints, timeout=settings.etcd_timeout_seconds, failover=True
        )
    return EtcdStore(
        client, settings.service_name, settings.claim_ttl_seconds, settings.dedup_ttl_seconds
    )


class AuthenticatingClient(pyetcd.MultiEndpointEtcd3Client):
    """An etcd client that logs in with user and password on first use, and again on demand.

    pyetcd logs in once, in its constructor, and keeps that token forever; etcd forgets it on
    restart. Here the login is an ordinary call: it fails over between endpoints like any
    other, and a failed login at start-up is retried instead of raising from a constructor.
    The token lives only in the request metadata: it is never logged.
    """

    def __init__(
        self, endpoints: list[pyetcd.Endpoint], timeout: float, user: str, password: str
    ) -> None:
        super().__init__(endpoints=endpoints, timeout=timeout, failover=True)
        self.user = user
        self._password = password
        self._token_lock = threading.Lock()

    def ensure_token(self) -> None:
        if self.metadata is None:
            with self._token_lock:
                if self.metadata is None:
                    self._authenticate()
                    log.info("logged in to etcd at %s as %s", _endpoint_name(self), self.user)

    def forget_token(self) -> None:
        self.metadata = None

    # pyetcd's own wrapper: a dead endpoint is marked failed, as for every other call.
    @pyetcd.MultiEndpointEtcd3Client._handle_errors
    def _authenticate(self) -> None:
        request = pyetcd.etcdrpc.AuthenticateRequest(name=self.user, password=self._password)
        reply = self.authstub.Authenticate(request, self.timeout)
        # Only as request metadata: pyetcd's own login also sets it as call credentials,
        # which gRPC refuses on a channel without TLS.
        # pyetcd leaves the attribute unannotated, so mypy infers None from its __init__.
        self.metadata = (("token", reply.token),)  # type: ignore[assignment]


def _refresh(client: pyetcd.MultiEndpointEtcd3Client, lease_id: int) -> list[Any]:
    return list(client.refresh_lease(lease_id))


def _is_stale(exc: BaseException) -> bool:
    """Whether etcd rejected our token (not our password): a new login may fix it."""
    if not isinstance(exc, grpc.RpcError):
        return False
    if exc.code() is grpc.StatusCode.UNAUTHENTICATED:  # type: ignore[attr-defined]
        return True
    # Also a call that raced a concurrent re-login and went out with no token at all.
    details = exc.details() or ""  # type: ignore[attr-defined]
    return "auth store is old" in details or "user name is empty" in details


def _is_refusal(exc: BaseException) -> bool:
    cause = _grpc_error(exc)
    if cause is None:
        return False
    if cause.code() in REFUSED_CODES:  # type: ignore[attr-defined]
        return True
    # A failed certificate check reaches us as UNAVAILABLE, like a dead endpoint.
    return "CERTIFICATE" in (cause.details() or "").upper()  # type: ignore[attr-defined]


def _is_auth_error(exc: BaseException) -> bool:
    cause = _grpc_error(exc)
    return cause is not None and cause.code() in REFUSED_CODES  # type: ignore[attr-defined]


def _grpc_error(exc: BaseException) -> grpc.RpcError | None:
    """The gRPC error behind ``exc``: pyetcd replaces some by its own, detail-less classes."""
    if isinstance(exc, grpc.RpcError):
        return exc
    if isinstance(exc.__context__, grpc.RpcError):
        return exc.__context__
    return None


def _endpoint_name(client: pyetcd.MultiEndpointEtcd3Client) -> str:
    endpoint = client.endpoint_in_use
    return f"{endpoint.protocol}://{endpoint.netloc}" if endpoint is not None else "etcd"


def _is_finished(value: bytes, lease_id: int) -> bool:
    # A key without a lease is a record whatever its value (e.g. written by hand or another tool).
    return value == DONE_VALUE or lease_id == 0


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _describe(exc: BaseException) -> str:
    cause = _grpc_error(exc)
    if cause is not None:
        return f"{cause.code().name}: {cause.details()}"  # type: ignore[attr-defined]
    return str(exc) or type(exc).__name__


__all__ = ["DedupStore", "DisabledStore", "EtcdStore", "Verdict", "open_store"]
