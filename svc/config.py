"""Settings, read once at start from the environment and an optional ``.env`` file.

Order of precedence: the real environment, then ``.env`` in the working directory, then the
defaults below. Every variable is validated here; a bad one raises :class:`ConfigError` whose
message names the variable, the value given and the form expected.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

from svc.errors import ConfigError

# Variable names and their defaults, side by side.
SERVICE_NAME = "SERVICE_NAME"
ENABLE_ETCD = "ENABLE_ETCD"
RABBIT_URL = "RABBIT_URL"
ETCD_ENDPOINTS = "ETCD_ENDPOINTS"
STATSD_HOST = "STATSD_HOST"
STATSD_PORT = "STATSD_PORT"
PREFETCH = "PREFETCH"
LOG_LEVEL = "LOG_LEVEL"
LOG_EVENTS = "LOG_EVENTS"
ETCD_TIMEOUT = "ETCD_TIMEOUT"
DEDUP_CLAIM_TTL = "DEDUP_CLAIM_TTL"
DEDUP_TTL = "DEDUP_TTL"
MAX_ATTEMPTS = "MAX_ATTEMPTS"
SUMMARY_INTERVAL = "SUMMARY_INTERVAL"
HANDLER_MODULES = "HANDLER_MODULES"
# Test-only: never set these in production (see the README's "Testing the crash windows").
TEST_CRASH_AT = "TEST_CRASH_AT"
TEST_HANDLED_LOG = "TEST_HANDLED_LOG"

DEFAULTS: dict[str, str] = {
    ENABLE_ETCD: "false",
    RABBIT_URL: "amqp://guest:guest@localhost:5672/%2F",
    ETCD_ENDPOINTS: "localhost:2379",
    STATSD_HOST: "127.0.0.1",
    STATSD_PORT: "8125",
    PREFETCH: "100",
    LOG_LEVEL: "INFO",
    LOG_EVENTS: "true",
    ETCD_TIMEOUT: "5",
    DEDUP_CLAIM_TTL: "30",
    DEDUP_TTL: "forever",
    MAX_ATTEMPTS: "5",
    SUMMARY_INTERVAL: "60",
    HANDLER_MODULES: "",
    TEST_CRASH_AT: "off",
    TEST_HANDLED_LOG: "",
}

_SERVICE_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
_DECIMAL_RE = re.compile(r"[0-9]{1,9}")
_YES = frozenset({"true", "1", "yes", "on"})
_NO = frozenset({"false", "0", "no", "off"})
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The points where TEST_CRASH_AT makes the process SIGKILL itself, in the order reached.
CRASH_POINTS = ("after-delivery", "after-claim", "after-handle", "after-record")
# Note: AMQP's basic.qos carries prefetch-count as a 16-bit field.
_MAX_PREFETCH = 65535
_MAX_DEDUP_TTL_SECONDS = 366 * 86400

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The validated settings of one service process."""

    service_name: str
    enable_etcd: bool = False
    rabbit_urls: tuple[str, ...] = (DEFAULTS[RABBIT_URL],)
    etcd_endpoints: tuple[tuple[str, int], ...] = (("localhost", 2379),)
    statsd_host: str = "127.0.0.1"
    statsd_port: int = 8125
    prefetch: int = 100
    log_level: str = "INFO"
    log_events: bool = True
    etcd_timeout_seconds: float = 5.0
    claim_ttl_seconds: int = 30
    dedup_ttl_seconds: int | None = None
    max_attempts: int = 5
    summary_interval_seconds: float = 60.0
    handler_modules: tuple[str, ...] = ()
    crash_at: str | None = None
    handled_log: str | None = None

    @property
    def queue(self) -> str:
        return f"{self.service_name}-queue"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.service_name}-dlq"

    def describe(self) -> str:
        """One line of the effective settings, with passwords redacted."""
        endpoints = ",".join(f"{host}:{port}" for host, port in self.etcd_endpoints)
        return (
            f"service={self.service_name} enable_etcd={self.enable_etcd} "
            f"rabbit_url={','.join(redact_url(u) for u in self.rabbit_urls)} "
            f"etcd_endpoints={endpoints} etcd_timeout={self.etcd_timeout_seconds:g}s "
            f"claim_ttl={self.claim_ttl_seconds}s statsd={self.statsd_host}:{self.statsd_port} "
            f"prefetch={self.prefetch} log_level={self.log_level} log_events={self.log_events} "
            f"dedup_ttl={self.dedup_ttl_seconds or 'forever'} max_attempts={self.max_attempts}"
            + (f" TEST_CRASH_AT={self.crash_at}" if self.crash_at else "")
            + (f" TEST_HANDLED_LOG={self.handled_log}" if self.handled_log else "")
        )


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike[str] = ".env"
) -> Settings:
    """Read and validate every setting; raise ConfigError naming the first bad variable."""
    env = merged_environment(os.environ if environ is None else environ, dotenv_path)
    return Settings(
        service_name=read(env, SERVICE_NAME, parse_service_name),
        enable_etcd=read(env, ENABLE_ETCD, parse_flag),
        rabbit_urls=read(env, RABBIT_URL, parse_rabbit_urls),
        etcd_endpoints=read(env, ETCD_ENDPOINTS, parse_endpoints),
        statsd_host=read(env, STATSD_HOST, parse_host),
        statsd_port=read(env, STATSD_PORT, parse_port),
        prefetch=read(env, PREFETCH, parse_prefetch),
        log_level=read(env, LOG_LEVEL, parse_log_level),
        log_events=read(env, LOG_EVENTS, parse_flag),
        etcd_timeout_seconds=read(env, ETCD_TIMEOUT, parse_seconds),
        claim_ttl_seconds=read(env, DEDUP_CLAIM_TTL, parse_whole_seconds),
        dedup_ttl_seconds=read(env, DEDUP_TTL, parse_optional_ttl),
        max_attempts=read(env, MAX_ATTEMPTS, parse_attempts),
        summary_interval_seconds=read(env, SUMMARY_INTERVAL, parse_seconds),
        handler_modules=read(env, HANDLER_MODULES, parse_module_names),
        crash_at=read(env, TEST_CRASH_AT, parse_crash_point),
        handled_log=read(env, TEST_HANDLED_LOG, lambda raw: raw or None),
    )


def merged_environment(
    environ: Mapping[str, str], dotenv_path: str | os.PathLike[str]
) -> dict[str, str]:
    """The ``.env`` file's values overlaid by the real environment (which wins)."""
    from_file = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
    return {**from_file, **environ}


def read(env: Mapping[str, str], name: str, parse: Callable[[str], T]) -> T:
    """Parse variable ``name`` (or its default); wrap a ValueError into a ConfigError."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if name not in DEFAULTS:
            raise ConfigError(f"{name} is required but not set")
        raw = DEFAULTS[name]
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}={_bounded_repr(raw)} is invalid: expected {exc}") from None


def _bounded_repr(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Each parser raises ValueError with the expected form as its message.


def _is_decimal(raw: str) -> bool:
    return _DECIMAL_RE.fullmatch(raw) is not None


def parse_service_name(raw: str) -> str:
    if not _SERVICE_NAME_RE.fullmatch(raw):
        raise ValueError("1 to 64 characters among lowercase letters, digits, '-' and '_'")
    return raw


def parse_flag(raw: str) -> bool:
    value = raw.lower()
    if value in _YES:
        return True
    if value in _NO:
        return False
    raise ValueError("one of true/false/1/0/yes/no/on/off (any case)")


def parse_rabbit_urls(raw: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in raw.split(","))
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(
                "one or more comma-separated AMQP URLs like amqp://user:pass@host:5672/%2F"
            )
        try:
            parts.port  # noqa: B018 - urlsplit checks the port only when asked
        except ValueError:
            raise ValueError("AMQP URLs with a numeric port between 0 and 65535") from None
    return urls


def parse_endpoints(raw: str) -> tuple[tuple[str, int], ...]:
    endpoints = []
    for item in raw.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host:
            raise ValueError("comma-separated host:port pairs, e.g. localhost:2379")
        endpoints.append((host.strip("[]"), parse_port(port)))
    return tuple(endpoints)


def parse_host(raw: str) -> str:
    if any(c.isspace() for c in raw):
        raise ValueError("a host name or IP address")
    return raw


def parse_port(raw: str) -> int:
    if not _is_decimal(raw) or not 1 <= int(raw) <= 65535:
        raise ValueError("a port number between 1 and 65535")
    return int(raw)


def parse_prefetch(raw: str) -> int:
    if not _is_decimal(raw) or not 1 <= int(raw) <= _MAX_PREFETCH:
        raise ValueError(f"a positive integer of at most {_MAX_PREFETCH}")
    return int(raw)


def parse_log_level(raw: str) -> str:
    level = raw.upper()
    if level not in _LEVELS:
        raise ValueError("a logging level name: " + ", ".join(_LEVELS))
    return level


def parse_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < 3600:  # also false for NaN
        raise ValueError("a number of seconds above 0 and below 3600")
    return value


def parse_whole_seconds(raw: str) -> int:
    if not _is_decimal(raw) or not 1 <= int(raw) <= 86400:
        raise ValueError("a whole number of seconds between 1 and 86400")
    return int(raw)


def parse_optional_ttl(raw: str) -> int | None:
    if raw.lower() == "forever":
        return None
    if not _is_decimal(raw) or not 1 <= int(raw) <= _MAX_DEDUP_TTL_SECONDS:
        raise ValueError(
            f"'forever' or a whole number of seconds from 1 to {_MAX_DEDUP_TTL_SECONDS}"
        )
    return int(raw)


def parse_attempts(raw: str) -> int:
    if not _is_decimal(raw) or not 1 <= int(raw) <= 100:
        raise ValueError("a whole number of attempts between 1 and 100")
    return int(raw)


def parse_module_names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError("comma-separated importable module names, e.g. myapp.handlers")
    return names


def parse_crash_point(raw: str) -> str | None:
    if raw.lower() == "off":
        return None
    if raw not in CRASH_POINTS:
        raise ValueError("'off' or one of " + ", ".join(CRASH_POINTS))
    return raw


def level_number(name: str) -> int:
    """The logging module's number for a validated level name."""
    return int(logging.getLevelName(name))
