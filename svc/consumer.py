"""RabbitMQ topology, the consume loop, acks, dead-lettering and reconnects.

When a delivery is acked: only once its outcome is final. A handled event is acked after its
handler returned and, with de-duplication on, after its id was recorded in etcd; a bad body
after the transaction holding its dead-letter copy was committed; a skipped or unknown-type event at
once. A delivery whose id another replica is still handling is held, unacked, and asked about
again after a delay. Nothing is acked on a channel other than the one that delivered it: after
a reconnect the broker has already requeued everything the old channel held.

Deliveries are settled in batches: whatever is waiting when the loop wakes, up to the prefetch
window, shares one etcd transaction per step and one ``multiple=True`` ack. A lone event is
not delayed: a batch closes as soon as no further delivery is waiting.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from svc import amqp_fields
from svc.backoff import Backoff
from svc.config import redact_url
from svc.dedup import Verdict
from svc.errors import BrokerRefused, StoreRefused, StoreUnavailable, TopologyError, TransientError
from svc.events import Event, InvalidEvent, decode
from svc.faults import CrashPoint, HandledLog
from svc.handlers import HANDLERS, Handler, run_handlers
from svc.log_budget import LineBudget
from svc.tls import (
    broker_parameters,
    client_context,
    describe_connect_error,
    describe_handshake_error,
)

if TYPE_CHECKING:
    from svc.config import Settings
    from svc.dedup import DedupStore
    from svc.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

EXCHANGE = "events"
BINDING_KEY = "#"
LOST = "broker connection lost"
# A failed connect names every RABBIT_URL tried and why: room for a few, each reason included.
URLS_TEXT_LIMIT = 2000
REASON_HEADER = "x-reason"
DROPPED_HEADERS_HEADER = "x-original-headers-dropped"
# How long the loop waits for deliveries before it looks at its stop flag and held deliveries.
IDLE_WAIT_SECONDS = 0.5
HOLD_RETRY_SECONDS = 1.0
# Handled batches whose records may be on their way to etcd at once. While they are, the broker
# keeps delivering and this thread keeps decoding and handling: it waits for etcd only when
# this many are still unanswered.
RECORDS_IN_FLIGHT = 2
# Broker errors after which reconnecting can help.
CONNECTION_ERRORS = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
)


@dataclass(slots=True)
class Delivery:
    tag: int
    body: bytes
    properties: BasicProperties
    exchange: str
    routing_key: str
    redelivered: bool
    event: Event | None = None
    outcome: str = ""
    waits: int = 0  #: how often it was held because another replica had claimed its id


@dataclass(slots=True)
class HeldDelivery:
    delivery: Delivery
    retry_at: float


@dataclass
class Batch:
    """The deliveries settled together, sorted into what happens to each."""

    settled: list[Delivery] = field(default_factory=list)
    to_handle: list[Delivery] = field(default_factory=list)
    #: the deliveries whose ids this batch asks etcd for, by id
    primaries: dict[str, Delivery] = field(default_factory=dict)
    #: later copies of an id this batch or ``earlier`` claims: they share the first copy's fate
    followers: list[Delivery] = field(default_factory=list)
    #: the batch claimed just before this one, if it was not handled yet when this one came
    earlier: Batch | None = None
    held: list[Delivery] = field(default_factory=list)
    #: ids this process claimed for the batch
    claimed: list[str] = field(default_factory=list)
    #: ids handled and not yet recorded in etcd; the batch is acked once they are
    to_record: list[str] = field(default_factory=list)
    #: the claim of ``claimed``, then the record of ``to_record``, while etcd has them
    claiming: Future[dict[str, Verdict]] | None = None
    recording: Future[None] | None = None


class Consumer:
    """Consumes ``<name>-queue`` until :meth:`request_stop`, reconnecting whenever it is lost."""

    def __init__(
        self,
        settings: Settings,
        store: DedupStore,
        metrics: Metrics,
        handlers: Mapping[str, Handler] = HANDLERS,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.handlers = handlers
        self._dedup_on = settings.enable_etcd
        self._stopping = False
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._dlq_channel: BlockingChannel | None = None
        self._dead_letters_uncommitted = 0
        self._dead_letters_returned = 0
        self._consumer_tag: str | None = None
        self._inbox: list[Delivery] = []
        self._held: list[HeldDelivery] = []
        self._unacked: set[int] = set()
        self._last_summary = time.monotonic()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handler")
        # Records go out while the next batch is claimed, each on a thread of its own.
        self._store_thread = ThreadPoolExecutor(
            max_workers=RECORDS_IN_FLIGHT, thread_name_prefix="store"
        )
        self._claim_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claim")
        # Claims in etcd's hands, not handled yet: the batch handled next, and the one after it.
        self._claimed: list[Batch] = []
        self._current: Batch | None = None  # being handled
        # Handled, oldest first, to be acked in this order once etcd has their records.
        self._unrecorded: deque[Batch] = deque()
        self._salvaging = False
        # The window holds the batches being recorded, the one being handled, the one being
        # claimed, and room for the broker to deliver the next one meanwhile.
        self._batch_limit = max(1, settings.prefetch // (RECORDS_IN_FLIGHT + 3))
        self._tls_context = (
            client_context(settings.rabbit_tls) if settings.rabbit_tls.is_set else None
        )
        self.crash = CrashPoint(settings.crash_at)
        self._event_lines = LineBudget(settings.log_events_per_second)
        self.handled_log = HandledLog(settings.service_name, settings.handled_log)
        # Headers come from publishers: one pika cannot decode must not break the connection.
        amqp_fields.install()

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to stop after the batch in hand; safe to call from a signal handler."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> None:
        """Connect, consume, and reconnect with backoff until asked to stop.

        Raises TopologyError when the broker refuses our declarations: retrying cannot help.
        """
        backoff = Backoff()
        while not self._stopping:
            try:
                self._connect()
                backoff.reset()
                self._consume()
            except (*CONNECTION_ERRORS, TransientError) as exc:
                if self._stopping:
                    self._salvage()
                    self._forget_connection()
                    break
                delay = backoff.next_delay()
                if isinstance(exc, BrokerRefused):
                    log.error("%s; reconnecting in %.1f s", exc, delay)
                elif isinstance(exc, pika.exceptions.ProbableAuthenticationError):
                    log.error(
                        "RabbitMQ refused the login (%s): check the user and password in "
                        "RABBIT_URL (or RABBIT_PASSWORD / RABBIT_PASSWORD_FILE, or a .env file); "
                        "retrying in %.1f s",
                        _brief(exc, URLS_TEXT_LIMIT),
                        delay,
                    )
                elif not isinstance(exc, CONNECTION_ERRORS):
                    log.warning("gave up (%s); reconnecting in %.1f s", _brief(exc), delay)
                else:
                    # No connection yet (a failed attempt) reads differently from a lost one.
                    what = "cannot connect to RabbitMQ" if self._connection is None else LOST
                    text = _brief(exc, URLS_TEXT_LIMIT)
                    log.warning("%s (%s); reconnecting in %.1f s", what, text, delay)
                # Settle in etcd first what the lost channel held, so redeliveries are skipped.
                self._salvage()
                self._forget_connection()
                self.metrics.count("reconnects")
                self.metrics.flush()
                self.sleep_serviced(delay, wake_on_stop=True)
                self.summarise()
            except TopologyError:
                self._close()
                raise
            except Exception:
                # A bug must not kill the daemon: start over on a fresh connection, whose
                # broker requeues what the old one held, after a growing pause.
                self._salvage()
                self._forget_connection()
                delay = backoff.next_delay()
                log.exception("unexpected error; reconnecting in %.1f s", delay)
                self.sleep_serviced(delay, wake_on_stop=True)
        log.info("stop requested: closing after the batch in hand")
        self._close()
        self._worker.shutdown(wait=True)
        self._store_thread.shutdown(wait=True)
        self._claim_thread.shutdown(wait=True)
        self.handled_log.close()

    def _connect(self) -> None:
        log.info("connecting to RabbitMQ (%d URL(s))", len(self.settings.rabbit_urls))
        self._connection = self._open_connection()
        self._channel = self._connection.channel()
        self._declare_topology(self._channel)
        self._dlq_channel = self._connection.channel()
        # Note: a transaction, not publisher confirms: a batch's dead letters then cost one
        # round trip (tx.commit) instead of one each, so a flood of bad bodies cannot slow the
        # stream by a round trip per body. RabbitMQ hands over responsibility for a
        # transaction's messages, and sends back unroutable ones, on commit.
        # https://www.rabbitmq.com/docs/semantics
        self._dlq_channel.tx_select()
        self._dlq_channel.add_on_return_callback(self.on_dead_letter_returned)
        self._channel.basic_qos(prefetch_count=self.settings.prefetch)
        self._consumer_tag = self._channel.basic_consume(self.settings.queue, self.on_message)
        log.info(
            "consuming from %s (prefetch %d, de-duplication %s)",
            self.settings.queue,
            self.settings.prefetch,
            "on" if self._dedup_on else "off",
        )

    def _open_connection(self) -> BlockingConnection:
        """Connect to the first RABBIT_URL that answers; raise if none does.

        A failed certificate check is never worked around: that URL is skipped, and when no
        URL is left, BrokerRefused names each refused URL (password redacted) and why. Any
        other failure names each URL tried and why it failed, so the log line says where to
        look.
        """
        refusals: list[str] = []  # TLS handshakes refused, each with its URL and why
        failures: list[str] = []  # every other URL tried, with why it failed
        login_refused = False
        last_error: Exception | None = None
        for url in self.settings.rabbit_urls:
            try:
                return BlockingConnection(broker_parameters(url, self._tls_context))
            except ssl.SSLError as exc:
                refusals.append(f"{redact_url(url)}: {describe_handshake_error(exc)}")
            except (pika.exceptions.AMQPConnectionError, OSError) as exc:
                if "SSLError" in str(exc):  # the broker refused our certificate, or none
                    refusals.append(f"{redact_url(url)}: {describe_handshake_error(exc)}")
                else:
                    failures.append(f"{redact_url(url)}: {describe_connect_error(exc)}")
                    login_refused |= isinstance(exc, pika.exceptions.ProbableAuthenticationError)
                last_error = exc
        # The worst failure decides how run() logs it (and with which advice); the line names
        # every URL tried.
        if refusals:
            others = f"; also tried {'; '.join(failures)}" if failures else ""
            raise BrokerRefused(
                f"TLS handshake refused by RabbitMQ at {'; '.join(refusals)}{others}"
            )
        if login_refused:
            raise pika.exceptions.ProbableAuthenticationError("; ".join(failures)) from last_error
        raise pika.exceptions.AMQPConnectionError("; ".join(failures)) from last_error

    def _declare_topology(self, channel: BlockingChannel) -> None:
        """Declare exchange, queue, binding and dead-letter queue, exactly as the Go demo does."""
        queue, dlq = self.settings.queue, self.settings.dead_letter_queue
        steps: list[tuple[str, Callable[[], object]]] = [
            (
                f"exchange {EXCHANGE!r}",
                lambda: channel.exchange_declare(EXCHANGE, "topic", durable=True),
            ),
            (f"queue {queue!r}", lambda: channel.queue_declare(queue, durable=True)),
            (f"queue {dlq!r}", lambda: channel.queue_declare(dlq, durable=True)),
        ]
        for what, declare in steps:
            try:
                declare()
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:  # PRECONDITION_FAILED: exists with other arguments
                    raise
                raise TopologyError(
                    f"RabbitMQ refused to declare {what}: {exc.reply_text}. It exists with "
                    "other properties; delete it (rabbitmqctl delete_queue / the management "
                    "UI) or declare it durable with no extra arguments, then start again."
                ) from None
        channel.queue_bind(queue, EXCHANGE, routing_key=BINDING_KEY)

    def _salvage(self) -> None:
        """Settle in etcd the batches whose acks can no longer happen, before reconnecting.

        Handled ids are recorded, so their redelivered copies are skipped instead of handled
        again; ids claimed but not handled are released, so that no replica waits for them.
        """
        batches = [*self._unrecorded, self._current, *self._claimed]
        self._unrecorded.clear()
        self._claimed.clear()
        self._current = None
        self._salvaging = True
        try:
            self._settle_in_store([b for b in batches if b is not None])
        finally:
            self._salvaging = False

    def _settle_in_store(self, batches: list[Batch]) -> None:
        for batch in batches:
            # A claim or record still on its way to etcd may yet be applied: let it land first,
            # or a release could overtake the claim and leave the id held by our live lease.
            if batch.claiming is not None:
                wait_for_futures([batch.claiming])
            if batch.recording is not None:
                wait_for_futures([batch.recording])
            recorded = set(batch.to_record)
            unhandled = [i for i in batch.claimed if i not in recorded]
            try:
                if batch.to_record and not _succeeded(batch.recording):
                    self._retry_store(lambda: self.store.record(batch.to_record))  # noqa: B023
                if unhandled:
                    self._retry_store(lambda: self.store.release(unhandled))  # noqa: B023
            except TransientError:
                log.warning(
                    "could not settle %d ids in etcd before reconnecting", len(batch.claimed)
                )

    def _forget_connection(self) -> None:
        # Tags of the lost channel mean nothing on the next one; the broker requeued them.
        self._unrecorded.clear()
        self._claimed.clear()
        self._current = None
        self._inbox.clear()
        self._held.clear()
        self._unacked.clear()
        connection, self._connection = self._connection, None
        self._channel = self._dlq_channel = None
        self._dead_letters_uncommitted = self._dead_letters_returned = 0
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except CONNECTION_ERRORS:
                pass

    def _close(self) -> None:
        """Cancel the consumer, return what we hold to the queue, close the connection."""
        if self._connection is None or not self._connection.is_open:
            self._forget_connection()
            return
        try:
            if self._channel is not None and self._consumer_tag is not None:
                # Deliveries not yet dispatched to us are returned to the queue by the cancel.
                self._channel.basic_cancel(self._consumer_tag)
            for tag in sorted(self._unacked):
                self._channel.basic_nack(tag, requeue=True)  # type: ignore[union-attr]
            self._unacked.clear()
            self._connection.close()
        except CONNECTION_ERRORS as exc:
            log.warning("broker connection lost while closing (%s)", _brief(exc))
        self._forget_connection()

    # -- the consume loop -----------------------------------------------------------------

    def on_message(
        self,
        channel: BlockingChannel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        """Called by pika for each delivery; only collects it, the loop settles it."""
        self._unacked.add(method.delivery_tag)
        self._inbox.append(
            Delivery(
                tag=method.delivery_tag,
                body=body,
                properties=properties,
                exchange=method.exchange,
                routing_key=method.routing_key,
                redelivered=method.redelivered,
            )
        )

    def _consume(self) -> None:
        assert self._connection is not None
        while not self._stopping:
            self._check_connection()
            busy = self._inbox or self._pipeline_busy()
            self._connection.process_data_events(time_limit=0 if busy else IDLE_WAIT_SECONDS)
            if self._inbox:
                self._gather()
                limit = self._batch_limit
                batch, self._inbox = self._inbox[:limit], self._inbox[limit:]
                self._settle(batch)
            elif self._pipeline_busy():
                self._advance(None)  # nothing else waits: record and ack at once
            self._retry_held()
            self._event_lines.tick()
            self.summarise()
        if self._pipeline_busy():
            self._advance(None)

    def _gather(self) -> None:
        """Take in deliveries already waiting, until the batch is full or none are left."""
        assert self._connection is not None
        while len(self._inbox) < self._batch_limit:
            before = len(self._inbox)
            self._connection.process_data_events(time_limit=0)
            if len(self._inbox) == before:
                return

    def _settle(self, deliveries: list[Delivery]) -> None:
        """Decode and route a batch of new deliveries, then move it through the pipeline."""
        batch = Batch()
        for delivery in deliveries:
            self._route(delivery, batch)
        self._commit_dead_letters()
        self.crash.reached("after-delivery")
        self._advance(batch)

    def _pipeline_busy(self) -> bool:
        return bool(self._claimed or self._unrecorded)

    def _advance(self, batch: Batch | None) -> None:
        """One pipeline step: claim ``batch``, handle the batch claimed before, ack the recorded.

        This thread waits for etcd as little as it can. ``batch``'s claim goes out at once and
        is answered while the batch before it is handled; a handled batch's record goes out at
        once and is waited for only when RECORDS_IN_FLIGHT others are still unanswered. So the
        broker keeps delivering, and this thread keeps decoding and handling, while etcd
        writes. Batches are acked in the order they came. ``None`` (nothing else is waiting)
        finishes every batch in hand, so a lone event is not held back.
        """
        earlier = self._claimed[0] if self._claimed else None
        if batch is not None:
            self._start_claim(batch, earlier)
        self._finish_recorded(room=RECORDS_IN_FLIGHT - 1 if batch is not None else 0)
        if earlier is not None:
            self._process(earlier)
        if batch is not None and batch.claiming is None:
            self._process(batch)  # nothing to wait for; else handled in the next step
        if batch is None:
            self._finish_recorded(room=0)

    def _start_claim(self, batch: Batch, earlier: Batch | None) -> None:
        batch.primaries = self._plan_claims(batch, earlier)
        if batch.primaries:
            # Until etcd answers, every id asked for may be ours: a claim whose reply was lost
            # may have been applied. If the connection goes first, _salvage releases them all
            # (a release deletes only keys holding our own token), or they would stay held by
            # our live lease and no replica would ever handle those events.
            batch.claimed = list(batch.primaries)
            batch.claiming = self._claim_thread.submit(self.store.claim, batch.claimed)
            self._claimed.append(batch)  # from now on, _salvage knows of its claim

    def _process(self, batch: Batch) -> None:
        """Sort a batch by its claim's verdicts, handle it, and send its record to etcd."""
        self._current = batch
        if batch.claiming is not None:
            self._claimed.remove(batch)
            verdicts = self._await_claim(batch)
            batch.claimed = [i for i, v in verdicts.items() if v is Verdict.NEW]
            self.crash.reached("after-claim")
            self._apply_verdicts(batch, verdicts)
        elif batch.followers:
            self._apply_verdicts(batch, {})
        self._handle(batch)
        self._current = None
        if batch.to_record:
            batch.recording = self._store_thread.submit(self.store.record, batch.to_record)
            self._unrecorded.append(batch)
        elif self._unrecorded:
            self._unrecorded.append(batch)  # acked after the batches before it
        else:
            self._finish(batch)

    def _finish_recorded(self, room: int) -> None:
        """Ack recorded batches, oldest first; wait for etcd until at most ``room`` are left."""
        while self._unrecorded:
            oldest = self._unrecorded[0]
            done = oldest.recording is None or oldest.recording.done()
            if len(self._unrecorded) <= room and not done:
                return
            self._await_record(oldest)
            self._unrecorded.popleft()
            self._finish(oldest)

    def _await_claim(self, batch: Batch) -> dict[str, Verdict]:
        assert batch.claiming is not None
        try:
            return batch.claiming.result()
        except StoreUnavailable:
            return self._retry_store(lambda: self.store.claim(batch.claimed))

    def _await_record(self, batch: Batch) -> None:
        if batch.recording is None:
            return
        try:
            batch.recording.result()
        except StoreUnavailable:
            self._retry_store(lambda: self.store.record(batch.to_record))

    def _finish(self, batch: Batch) -> None:
        """Ack a batch whose records are durable; hold what another replica is handling."""
        self._check_connection()
        for delivery in batch.held:
            # Wait longer each time, up to the claim TTL: a dead holder's claim expires by then.
            delay = min(HOLD_RETRY_SECONDS * 2**delivery.waits, self.settings.claim_ttl_seconds)
            delivery.waits += 1
            self._held.append(HeldDelivery(delivery, time.monotonic() + delay))
        if batch.to_record:
            self.crash.reached("after-record")
        self._ack([d.tag for d in batch.settled])
        for delivery in sorted(batch.settled, key=lambda d: d.tag):
            if delivery.outcome != "ok":  # "ok" was logged when the handler returned
                self._log_outcome(delivery)
        self.metrics.flush()

    def _route(self, delivery: Delivery, batch: Batch) -> None:
        """Decode one delivery and sort it: dead-letter, unknown type, or to be handled."""
        if delivery.redelivered:
            self.metrics.count("redelivered")
        try:
            event = decode(delivery.body)
        except InvalidEvent as exc:
            self._dead_letter(delivery, exc.code, exc.detail)
            self.metrics.count("invalid")
            delivery.outcome = f"dead-lettered ({exc.code})"
            batch.settled.append(delivery)
            return
        delivery.event = event
        if self.settings.log_events and self._event_lines.allow():
            log.info(
                "received id=%s type=%s tag=%d", _safe(event.id), _safe(event.type), delivery.tag
            )
        if event.type not in self.handlers:
            self.metrics.count("unknown_type")
            delivery.outcome = "ignored (unknown type)"
            batch.settled.append(delivery)
            return
        batch.to_handle.append(delivery)

    def _plan_claims(self, batch: Batch, earlier: Batch | None) -> dict[str, Delivery]:
        """Pick the deliveries whose ids must be claimed; skip or set aside the rest.

        An id already finished is skipped, and so is one an earlier batch is recording: that
        record is durable before this batch is acked. A later copy of an id this batch or the
        one before it claims follows the first copy's fate (see _apply_verdicts).
        """
        if not self._dedup_on:
            return {}
        candidates, batch.to_handle = batch.to_handle, []
        recording = {i for b in self._unrecorded for i in b.to_record}
        claimed_before = earlier.primaries if earlier is not None else {}
        primaries: dict[str, Delivery] = {}
        for delivery in candidates:
            event_id = _event(delivery).id
            if self.store.is_known(event_id) or event_id in recording:
                self._skip(delivery, batch)
            elif event_id in primaries or event_id in claimed_before:
                batch.followers.append(delivery)
            else:
                primaries[event_id] = delivery
        if batch.followers:
            batch.earlier = earlier
        return primaries

    def _apply_verdicts(self, batch: Batch, verdicts: dict[str, Verdict]) -> None:
        """Sort claimed deliveries: ours to handle, finished to skip, busy elsewhere to hold.

        A follower is held when its first copy was, and skipped otherwise: the first copy was
        finished before, or is handled in this batch or the one before, whose record is
        durable before this batch is acked.
        """
        for event_id, delivery in batch.primaries.items():
            verdict = verdicts[event_id]
            if verdict is Verdict.NEW:
                batch.to_handle.append(delivery)
            elif verdict is Verdict.DONE:
                self._skip(delivery, batch)
            else:
                batch.held.append(delivery)
        busy = {_event(d).id for d in batch.held}
        if batch.earlier is not None:
            busy.update(_event(d).id for d in batch.earlier.held)
            batch.earlier = None  # let it go once acked
        for delivery in batch.followers:
            if _event(delivery).id in busy:
                batch.held.append(delivery)
            else:
                self._skip(delivery, batch)

    def _handle(self, batch: Batch) -> None:
        """Run the handlers; dead-letter the events that kept failing; mark the rest to record."""
        if not batch.to_handle:
            return
        events = [_event(d) for d in batch.to_handle]
        attempts = self.settings.max_attempts
        failures = self._run_serviced(lambda: run_handlers(self.handlers, events, attempts))
        succeeded = [d for n, d in enumerate(batch.to_handle) if n not in failures]
        # Say "ok" as soon as the work is done: once recorded, a killed process's events are
        # skipped on redelivery, so a line or count deferred to the ack could be lost for good.
        for delivery in succeeded:
            self.metrics.count(f"{_event(delivery).type}_ok")
            delivery.outcome = "ok"
            self._log_outcome(delivery)
        self.metrics.flush()
        self.handled_log.write(_event(d).id for d in succeeded)
        self.crash.reached("after-handle")
        # The record must be durable before any ack (see _advance): a crash must not forget a
        # handled id.
        if self._dedup_on:
            batch.to_record = list(dict.fromkeys(_event(d).id for d in succeeded))
        batch.settled.extend(succeeded)
        failed = [(d, failures[n]) for n, d in enumerate(batch.to_handle) if n in failures]
        for delivery, error in failed:
            # Only the exception's class: its message may quote event data, and x-reason must
            # not carry any (the message is in the handler's WARNING line, as a repr).
            reason = f"{type(error).__name__} after {attempts} attempts"
            self._dead_letter(delivery, "handler-failed", reason)
            self.metrics.count("dead_lettered")
            delivery.outcome = "dead-lettered (handler failed)"
            batch.settled.append(delivery)
        self._commit_dead_letters()
        if self._dedup_on and failed:
            # Release the claims so that a republished copy is not held until the TTL runs out.
            failed_ids = [_event(d).id for d, _ in failed]
            self._retry_store(lambda: self.store.release(failed_ids))

    def _run_serviced(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the handler thread while this thread keeps the connection serviced.

        Handlers may be slow; pika answers heartbeats only while this thread is inside one of
        its calls, so waiting here instead of in the handler keeps the connection alive.
        """
        connection = self._connection
        assert connection is not None
        future = self._worker.submit(work)

        def wake(_: object) -> None:
            # Wake the I/O wait below as soon as the work is done, instead of polling for it.
            try:
                connection.add_callback_threadsafe(_nothing)
            except pika.exceptions.ConnectionWrongStateError:
                pass  # the connection was lost meanwhile; nobody is waiting in its I/O loop

        future.add_done_callback(wake)
        try:
            while not future.done():
                connection.process_data_events(time_limit=IDLE_WAIT_SECONDS)
        except CONNECTION_ERRORS:
            # The work goes on regardless: let it finish, so its outcome is recorded in etcd
            # (see _salvage); the next broker call raises the loss again.
            log.warning("the broker went away while handlers ran; letting them finish first")
        return future.result()

    def _check_connection(self) -> None:
        """Raise the loss of a connection that _run_serviced noticed but did not raise."""
        if self._connection is None or not self._connection.is_open:
            raise pika.exceptions.StreamLostError("the broker connection was lost")

    def _skip(self, delivery: Delivery, batch: Batch) -> None:
        self.metrics.count(f"{_event(delivery).type}_skipped")
        delivery.outcome = "skipped"
        batch.settled.append(delivery)

    def _retry_held(self) -> None:
        """Ask again about ids another replica was handling; settle those it finished."""
        now = time.monotonic()
        if not any(h.retry_at <= now for h in self._held):
            return
        due = [h.delivery for h in self._held if h.retry_at <= now]
        self._held = [h for h in self._held if h.retry_at > now]
        self._advance(Batch(to_handle=due))

    def summarise(self) -> None:
        """Log the counts once per interval: statsd over UDP can drop packets silently.

        Also while etcd or the broker is out, when the counts matter most, and when idle, so
        that a quiet log means a stuck process, not an idle one.
        """
        now = time.monotonic()
        interval = self.settings.summary_interval_seconds
        elapsed = now - self._last_summary
        if elapsed < interval:
            return
        self._last_summary = now
        # The loop looks at the clock about twice a second: a line is due up to half a second
        # late. Past a second late (a retry wait, a long batch), it names the real span.
        span = interval if elapsed - interval < 1.0 else elapsed
        counts = self.metrics.take_interval_counts()
        summary = " ".join(f"{name}={n}" for name, n in sorted(counts.items()))
        log.info("last %.0f s: %s", span, summary or "no events")

    def _retry_store(self, call: Callable[[], T]) -> T:
        """Run an etcd step until it answers, keeping the AMQP connection serviced meanwhile."""
        backoff = Backoff(first_seconds=0.2, cap_seconds=5.0)
        while True:
            try:
                result = call()
            except StoreUnavailable as exc:
                if self._stopping and backoff.attempt >= 3:
                    # Leave the batch unacked: the broker requeues it when we close.
                    raise
                delay = backoff.next_delay()
                level = logging.ERROR if isinstance(exc, StoreRefused) else logging.WARNING
                log.log(level, "%s; consumption paused, retrying in %.1f s", exc, delay)
                self.metrics.count("dedup_errors")
                self.metrics.flush()
                self.sleep_serviced(delay)
                self.summarise()
                continue
            if backoff.attempt:
                log.info("etcd answers again; consumption resumes")
            return result

    def sleep_serviced(self, seconds: float, wake_on_stop: bool = False) -> None:
        """Wait while keeping the connection alive, if there is one.

        Raises the loss of the connection, except while salvaging (when it is known lost).
        ``wake_on_stop`` ends the wait early once a stop was requested.
        """
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not (wake_on_stop and self._stopping):
            if self._connection is not None and self._connection.is_open:
                self._connection.sleep(min(left, IDLE_WAIT_SECONDS))
            elif self._salvaging or self._connection is None:
                time.sleep(min(left, IDLE_WAIT_SECONDS))
            else:
                self._check_connection()

    # -- acks and dead letters --------------------------------------------------------------

    def _ack(self, tags: list[int]) -> None:
        """Ack settled tags, with one ``multiple=True`` ack for the longest settled prefix."""
        if not tags:
            return
        assert self._channel is not None
        settled = set(tags)
        outstanding = sorted(self._unacked)
        prefix_end = None
        for tag in outstanding:
            if tag not in settled:
                break
            prefix_end = tag
        if prefix_end is not None:
            self._channel.basic_ack(prefix_end, multiple=True)
        for tag in sorted(settled):
            if prefix_end is None or tag > prefix_end:
                self._channel.basic_ack(tag)
        self._unacked -= settled
        if prefix_end is not None:
            self._unacked = {t for t in self._unacked if t > prefix_end}

    def _dead_letter(self, delivery: Delivery, code: str, detail: str) -> None:
        """Copy a delivery to ``<name>-dlq`` with its reason, in the open transaction.

        The copy is the broker's responsibility only after :meth:`_commit_dead_letters`, which
        the caller must call before acking the delivery.
        """
        self._check_connection()
        assert self._dlq_channel is not None
        original = delivery.properties
        headers = dict(original.headers or {})
        if not amqp_fields.encodable_headers(headers):
            headers = {DROPPED_HEADERS_HEADER: "the original headers could not be re-encoded"}
        headers[REASON_HEADER] = f"{code}: {detail}"
        headers["x-original-exchange"] = delivery.exchange
        headers["x-original-routing-key"] = delivery.routing_key
        properties = BasicProperties(
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            message_id=original.message_id,
            correlation_id=original.correlation_id,
            timestamp=original.timestamp,
            app_id=original.app_id,
            headers=headers,
            delivery_mode=pika.DeliveryMode.Persistent,
        )
        self._dlq_channel.basic_publish(
            "", self.settings.dead_letter_queue, delivery.body, properties, mandatory=True
        )
        self._dead_letters_uncommitted += 1
        # The id, when the body had a usable one, lets a reader find the event in the queue.
        event_id = f" id={_safe(delivery.event.id)}" if delivery.event is not None else ""
        log.warning(
            "dead-lettered tag=%d%s to %s: %s: %s",
            delivery.tag,
            event_id,
            self.settings.dead_letter_queue,
            code,
            detail,
        )

    def _commit_dead_letters(self) -> None:
        """Commit the dead letters sent since the last commit: one round trip for all of them.

        Raises TransientError if the broker returned any (``<name>-dlq`` is gone): the caller
        must then not ack; the reconnect declares the queue again and the broker redelivers.
        """
        if not self._dead_letters_uncommitted:
            return
        assert self._dlq_channel is not None and self._connection is not None
        self._dlq_channel.tx_commit()
        self._dead_letters_uncommitted = 0
        # Returns arrive before commit-ok; this hands them to on_dead_letter_returned.
        self._connection.process_data_events(time_limit=0)
        if self._dead_letters_returned:
            returned, self._dead_letters_returned = self._dead_letters_returned, 0
            raise TransientError(
                f"the broker returned {returned} dead letter(s): no queue "
                f"{self.settings.dead_letter_queue!r} to route them to"
            )

    def on_dead_letter_returned(
        self,
        channel: BlockingChannel,
        method: Basic.Return,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        """Called by pika for a dead letter the broker could not route; counted for the commit."""
        self._dead_letters_returned += 1

    def _log_outcome(self, delivery: Delivery) -> None:
        if not self.settings.log_events:
            return
        event = delivery.event
        if event is None or delivery.outcome.startswith("dead-lettered"):
            return  # already logged at WARNING by _dead_letter
        if not self._event_lines.allow():
            return
        log.info("%s id=%s %s", _safe(event.type), _safe(event.id), delivery.outcome)


def _event(delivery: Delivery) -> Event:
    """The decoded event of a delivery past routing (only those reach the later steps)."""
    assert delivery.event is not None
    return delivery.event


def _nothing() -> None:
    pass


def _safe(text: str, limit: int = 80) -> str:
    """Text fit for one log line: plain printable ASCII as is, else escaped; at most ``limit``.

    Non-ASCII text is escaped too, so a look-alike (Cyrillic "о" in "new_оrder") shows as such.
    """
    shown = text if text.isascii() and text.isprintable() and " " not in text else ascii(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _brief(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def _succeeded(future: Future[None] | None) -> bool:
    """Whether a finished record went through."""
    return future is not None and future.exception() is None
