"""Entry point: ``SERVICE_NAME=orders python -m svc``.

Exit status: 0 after a requested stop (SIGINT or SIGTERM), 2 for a bad setting, 3 when the
broker refuses our queues as declared. The daemon never exits on its own otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from svc.backoff import Backoff
from svc.config import (
    DEFAULTS,
    ENABLE_ETCD,
    ETCD_ENDPOINTS,
    HANDLER_MODULES,
    SECRETS,
    SERVICE_NAME,
    Settings,
    level_number,
    load_settings,
    merged_environment,
    shown_default,
)
from svc.consumer import Consumer
from svc.dedup import DedupStore, open_store
from svc.errors import ConfigError, StoreRefused, StoreUnavailable, TopologyError
from svc.handlers import load_handler_modules
from svc.metrics import Metrics

log = logging.getLogger("svc")

EXIT_CONFIG = 2
EXIT_TOPOLOGY = 3


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(usage())
        return 0
    if args:
        # Starting the daemon here would declare a queue the user did not mean to create.
        print(
            f"svc: unexpected argument {args[0]!r}: the service is configured only through "
            "environment variables; see `python -m svc --help`",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"svc: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings)
    try:
        load_handler_modules(settings.handler_modules)
    except ImportError as exc:
        given = ",".join(settings.handler_modules)
        origin = merged_environment(os.environ, ".env").origin(HANDLER_MODULES)
        print(
            f"svc: {HANDLER_MODULES}={given!r}{origin} is invalid: expected importable Python "
            f"modules ({exc})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    log.info("starting: %s", settings.describe())
    for name in settings.empty_with_default:
        # An empty value often comes from a compose file or a .env line left blank: say so, as
        # a mistyped value would have stopped the service.
        log.warning("%s is set but empty: its default %s applies", name, shown_default(name))
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


def usage() -> str:
    """The settings, with their defaults, for ``python -m svc --help``."""
    width = max(len(name) for name in DEFAULTS)
    rows = [
        f"  {name:<{width}} default: {value if value else '(unset)'}"
        for name, value in DEFAULTS.items()
        if not name.startswith("TEST_")
    ]
    secrets = ", ".join(f"{name}_FILE" for name in SECRETS)
    return "\n".join(
        [
            "usage: SERVICE_NAME=<name> [SETTING=value ...] python -m svc",
            "",
            "Consumes events from the RabbitMQ exchange 'events' on its own queue <name>-queue,",
            "skips ids it has handled before (ENABLE_ETCD=true), and counts in statsd.",
            "Settings come from the environment, then a .env file in the working directory:",
            f"  {SERVICE_NAME:<{width}} required: [a-z0-9_-], at most 64 characters",
            *rows,
            f"Secrets may come from files instead: {secrets}.",
            "The README's 'Settings' section says what each one does.",
            "Exit status: 0 after SIGINT/SIGTERM, 2 bad setting,",
            "3 queue declared elsewhere with other arguments.",
        ]
    )


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
    # pika logs each failed connection attempt as several ERROR lines with a traceback; the
    # consumer's own line already says what failed and when it retries. With LOG_LEVEL=DEBUG
    # its warnings and errors show too, never its debug lines (they print connection details).
    debugging = level_number(settings.log_level) <= logging.DEBUG
    logging.getLogger("pika").setLevel(logging.WARNING if debugging else logging.CRITICAL)


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
    hinted = False
    endpoints = len(consumer.settings.etcd_endpoints)
    failures = 0
    while not consumer.stopping:
        try:
            store.warm_up()
            return True
        except StoreUnavailable as exc:
            failures += 1
            delay = backoff.next_delay()
            level = logging.ERROR if isinstance(exc, StoreRefused) else logging.WARNING
            log.log(level, "%s; retrying the warm-up in %.1f s", exc, delay)
            # A failed endpoint is skipped at the next try: say that none answers only once
            # each had its turn.
            if failures >= endpoints and not hinted and not isinstance(exc, StoreRefused):
                hinted = True
                log.warning(
                    "no etcd answers at %s=%s: consumption starts once one does (for a local "
                    "one: `.venv/bin/etcd --data-dir .etcd-data`, or `bash scripts/stack "
                    "start`), or set %s=false",
                    ETCD_ENDPOINTS,
                    ",".join(f"{host}:{port}" for host, port in consumer.settings.etcd_endpoints),
                    ENABLE_ETCD,
                )
            consumer.sleep_serviced(delay, wake_on_stop=True)
            consumer.summarise()  # a waiting daemon must not look stuck
    return False


if __name__ == "__main__":
    sys.exit(main())
