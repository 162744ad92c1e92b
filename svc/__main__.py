"""Entry point: ``SERVICE_NAME=orders python -m svc``.

Exit status: 0 after a requested stop (SIGINT or SIGTERM), 2 for a bad setting, 3 when the
broker refuses our queues as declared. The daemon never exits on its own otherwise.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from svc.backoff import Backoff
from svc.config import Settings, level_number, load_settings
from svc.consumer import Consumer
from svc.dedup import DedupStore, open_store
from svc.errors import ConfigError, StoreUnavailable, TopologyError
from svc.handlers import load_handler_modules
from svc.metrics import Metrics

log = logging.getLogger("svc")

EXIT_CONFIG = 2
EXIT_TOPOLOGY = 3


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"svc: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings)
    log.info("starting: %s", settings.describe())

    try:
        load_handler_modules(settings.handler_modules)
    except ImportError as exc:
        log.critical("HANDLER_MODULES: cannot import %s", exc)
        return EXIT_CONFIG
    metrics = Metrics(settings.service_name, settings.statsd_host, settings.statsd_port)
    # As in the original: the series exist in Graphite before the first event.
    metrics.announce("new_order_ok", "new_order_skipped")
    store = open_store(settings)
    consumer = Consumer(settings, store, metrics)
    install_stop_handlers(consumer)
    try:
        if warm_up(store, consumer):
            consumer.run()
    except TopologyError as exc:
        log.critical("%s", exc)
        return EXIT_TOPOLOGY
    finally:
        store.close()
        metrics.close()
    log.info("stopped")
    return 0


class OneRecordPerLineFormatter(logging.Formatter):
    """Indents every line of a record after its first, tracebacks included.

    An exception's message may quote event data (a handler's error naming the id); a newline in
    it would otherwise start a line of a publisher's choosing that passes for a record of its own.
    """

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\n    ")


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        OneRecordPerLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level_number(settings.log_level), handlers=[handler])
    # pika logs every connection attempt at INFO/WARNING; our own lines already say what matters.
    logging.getLogger("pika").setLevel(max(logging.WARNING, level_number(settings.log_level)))


def install_stop_handlers(consumer: Consumer) -> None:
    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        # Only set a flag: logging here could re-enter a stderr write the signal interrupted,
        # fail, and lose the stop request. The consume loop logs that it is stopping.
        consumer.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def warm_up(store: DedupStore, consumer: Consumer) -> bool:
    """Load the finished ids before consuming, retrying while etcd is unreachable.

    Returns False if a stop was requested first.
    """
    backoff = Backoff()
    while not consumer.stopping:
        try:
            store.warm_up()
            return True
        except StoreUnavailable as exc:
            delay = backoff.next_delay()
            log.warning("%s; retrying the warm-up in %.1f s", exc, delay)
            consumer.sleep_serviced(delay, wake_on_stop=True)
    return False


if __name__ == "__main__":
    sys.exit(main())
