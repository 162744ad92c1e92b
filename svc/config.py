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
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from dotenv import dotenv_values

from svc.errors import ConfigError
from svc.tls import TlsFileError, TlsFiles, client_context

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
LOG_EVENTS_PER_SECOND = "LOG_EVENTS_PER_SECOND"
ETCD_TIMEOUT = "ETCD_TIMEOUT"
DEDUP_CLAIM_TTL = "DEDUP_CLAIM_TTL"
DEDUP_TTL = "DEDUP_TTL"
MAX_ATTEMPTS = "MAX_ATTEMPTS"
SUMMARY_INTERVAL = "SUMMARY_INTERVAL"
HANDLER_MODULES = "HANDLER_MODULES"
RABBIT_PASSWORD = "RABBIT_PASSWORD"
RABBIT_CA_FILE = "RABBIT_CA_FILE"
RABBIT_CERT_FILE = "RABBIT_CERT_FILE"
RABBIT_KEY_FILE = "RABBIT_KEY_FILE"
ETCD_CA_FILE = "ETCD_CA_FILE"
ETCD_CERT_FILE = "ETCD_CERT_FILE"
ETCD_KEY_FILE = "ETCD_KEY_FILE"
ETCD_USER = "ETCD_USER"
ETCD_PASSWORD = "ETCD_PASSWORD"
#: Secrets may instead be read from the file named by ``<name>_FILE``, keeping them out of
#: the environment; their values never appear in a log line or an error message.
SECRETS = (RABBIT_PASSWORD, ETCD_PASSWORD)
FILE_SUFFIX = "_FILE"
# Test-only: never set these in production (see the README's "Testing the crash windows").
TEST_CRASH_AT = "TEST_CRASH_AT"
TEST_HANDLED_LOG = "TEST_HANDLED_LOG"

DEFAULTS: dict[str, str] = {
    ENABLE_ETCD: "false",
    RABBIT_URL: "amqp://guest:guest@localhost:5672/%2F",
    ETCD_ENDPOINTS: "localhost:2379",
    STATSD_HOST: "127.0.0.1",
    STATSD_PORT: "8125",
    PREFETCH: "500",
    LOG_LEVEL: "INFO",
    LOG_EVENTS: "true",
    LOG_EVENTS_PER_SECOND: "100",
    ETCD_TIMEOUT: "5",
    DEDUP_CLAIM_TTL: "30",
    DEDUP_TTL: "forever",
    MAX_ATTEMPTS: "5",
    SUMMARY_INTERVAL: "60",
    HANDLER_MODULES: "",
    RABBIT_PASSWORD: "",
    RABBIT_CA_FILE: "",
    RABBIT_CERT_FILE: "",
    RABBIT_KEY_FILE: "",
    ETCD_CA_FILE: "",
    ETCD_CERT_FILE: "",
    ETCD_KEY_FILE: "",
    ETCD_USER: "",
    ETCD_PASSWORD: "",
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
    #: with their passwords: never log them unredacted (see describe)
    rabbit_urls: tuple[str, ...] = field(default=(DEFAULTS[RABBIT_URL],), repr=False)
    rabbit_tls: TlsFiles = field(default_factory=TlsFiles)
    etcd_endpoints: tuple[tuple[str, int], ...] = (("localhost", 2379),)
    #: TLS to every etcd endpoint (https:// endpoints, or any ETCD_*_FILE set)
    etcd_secure: bool = False
    etcd_tls: TlsFiles = field(default_factory=TlsFiles)
    etcd_user: str | None = None
    etcd_password: str | None = field(default=None, repr=False)
    statsd_host: str = "127.0.0.1"
    statsd_port: int = 8125
    prefetch: int = 500
    log_level: str = "INFO"
    log_events: bool = True
    #: per-event lines a second at most, the rest only counted; 0: no cap
    log_events_per_second: int = 100
    etcd_timeout_seconds: float = 5.0
    claim_ttl_seconds: int = 30
    dedup_ttl_seconds: int | None = None
    max_attempts: int = 5
    summary_interval_seconds: float = 60.0
    handler_modules: tuple[str, ...] = ()
    crash_at: str | None = None
    handled_log: str | None = None
    #: variables set to an empty value, for which the default applies
    empty_with_default: tuple[str, ...] = ()

    @property
    def queue(self) -> str:
        return f"{self.service_name}-queue"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.service_name}-dlq"

    def describe(self) -> str:
        """One line of the effective settings, with passwords redacted."""
        scheme = "https://" if self.etcd_secure else ""
        endpoints = ",".join(f"{scheme}{host}:{port}" for host, port in self.etcd_endpoints)
        return (
            f"service={self.service_name} enable_etcd={self.enable_etcd} "
            f"rabbit_url={','.join(redact_url(u) for u in self.rabbit_urls)} "
            + (f"rabbit_tls={self.rabbit_tls.describe()} " if self.rabbit_tls.is_set else "")
            + f"etcd_endpoints={endpoints} "
            + (f"etcd_tls={self.etcd_tls.describe()} " if self.etcd_secure else "")
            + (f"etcd_user={self.etcd_user} etcd_password=*** " if self.etcd_user else "")
            + f"etcd_timeout={self.etcd_timeout_seconds:g}s "
            f"claim_ttl={self.claim_ttl_seconds}s statsd={self.statsd_host}:{self.statsd_port} "
            f"prefetch={self.prefetch} log_level={self.log_level} log_events={self.log_events} "
            f"log_events_per_second={self.log_events_per_second} "
            f"dedup_ttl={self.dedup_ttl_seconds or 'forever'} max_attempts={self.max_attempts} "
            f"summary_interval={self.summary_interval_seconds:g}s"
            + (f" handler_modules={','.join(self.handler_modules)}" if self.handler_modules else "")
            + (f" TEST_CRASH_AT={self.crash_at}" if self.crash_at else "")
            + (f" TEST_HANDLED_LOG={self.handled_log}" if self.handled_log else "")
        )


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, even if the URL is malformed."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        if ":" not in userinfo:
            return url
        return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostport}"))
    scheme, sep, rest = url.partition("://")
    if "@" in rest and ":" in rest.rpartition("@")[0]:
        # An unencoded '/', '?' or '#' in the password ends the netloc early: hide everything
        # from the first ':' to the last '@' (a vhost with an '@' is hidden too, harmlessly).
        user, _, _ = rest.partition(":")
        return f"{scheme}{sep}{user}:***@{rest.rpartition('@')[2]}"
    return url


def load_settings(
    environ: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike[str] = ".env"
) -> Settings:
    """Read and validate every setting; raise ConfigError naming the first bad variable."""
    env = merged_environment(os.environ if environ is None else environ, dotenv_path)
    try:
        return _read_settings(env)
    except ConfigError as exc:
        raise ConfigError(env.blame(str(exc))) from None


def _read_settings(env: Environment) -> Settings:
    etcd_endpoints = read(env, ETCD_ENDPOINTS, parse_endpoints)
    etcd_tls = read_tls_files(env, ETCD_CA_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE)
    etcd_user, etcd_password = read_etcd_credentials(env)
    rabbit_urls = read_rabbit_urls(env)
    rabbit_tls = read_tls_files(env, RABBIT_CA_FILE, RABBIT_CERT_FILE, RABBIT_KEY_FILE)
    check_rabbit_tls(rabbit_urls, rabbit_tls)
    return Settings(
        service_name=read(env, SERVICE_NAME, parse_service_name),
        enable_etcd=read(env, ENABLE_ETCD, parse_flag),
        rabbit_urls=rabbit_urls,
        rabbit_tls=rabbit_tls,
        etcd_endpoints=tuple((host, port) for _, host, port in etcd_endpoints),
        etcd_secure=is_etcd_secure(etcd_endpoints, etcd_tls),
        etcd_tls=etcd_tls,
        etcd_user=etcd_user,
        etcd_password=etcd_password,
        statsd_host=read(env, STATSD_HOST, parse_host),
        statsd_port=read(env, STATSD_PORT, parse_port),
        prefetch=read(env, PREFETCH, parse_prefetch),
        log_level=read(env, LOG_LEVEL, parse_log_level),
        log_events=read(env, LOG_EVENTS, parse_flag),
        log_events_per_second=read(env, LOG_EVENTS_PER_SECOND, parse_lines_per_second),
        etcd_timeout_seconds=read(env, ETCD_TIMEOUT, parse_seconds),
        claim_ttl_seconds=read(env, DEDUP_CLAIM_TTL, parse_whole_seconds),
        dedup_ttl_seconds=read(env, DEDUP_TTL, parse_optional_ttl),
        max_attempts=read(env, MAX_ATTEMPTS, parse_attempts),
        summary_interval_seconds=read(env, SUMMARY_INTERVAL, parse_seconds),
        handler_modules=read(env, HANDLER_MODULES, parse_module_names),
        crash_at=read(env, TEST_CRASH_AT, parse_crash_point),
        handled_log=read(env, TEST_HANDLED_LOG, lambda raw: raw or None),
        empty_with_default=tuple(
            name for name, value in env.items() if DEFAULTS.get(name) and not value.strip()
        ),
    )


# python-dotenv warns of a line it cannot parse without naming the file.
dotenv_log = logging.getLogger("dotenv.main")


class _NameTheFile(logging.Filter):
    """Adds the file's path to python-dotenv's warnings."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        # The message is formatted later, with its arguments: a '%' in the path must stay one.
        record.msg = f"{record.msg} of {self.path.replace('%', '%%')}"
        return True


class Environment(dict[str, str]):
    """The variables in effect, knowing which came from the ``.env`` file."""

    def __init__(self, values: Mapping[str, str], from_file: set[str], path: str) -> None:
        super().__init__(values)
        self.from_file = frozenset(from_file)
        self.path = path

    def origin(self, name: str) -> str:
        """`` (from .env)`` for a variable read from the file, so an error points there."""
        return f" (from {self.path})" if name in self.from_file else ""

    def blame(self, message: str) -> str:
        """``message`` saying which of the variables it names came from the file, if any."""
        if f"(from {self.path})" in message:
            return message
        # Names in the quoted values shown are not what the message is about.
        outside_values = re.sub(r"'[^']*'|\"[^\"]*\"", "", message)
        named = [n for n in sorted(self.from_file) if re.search(rf"\b{n}\b", outside_values)]
        return f"{message} ({', '.join(named)} from {self.path})" if named else message


def merged_environment(
    environ: Mapping[str, str], dotenv_path: str | os.PathLike[str]
) -> Environment:
    """The ``.env`` file's values overlaid by the real environment (which wins)."""
    naming = _NameTheFile(os.fspath(dotenv_path))
    dotenv_log.addFilter(naming)
    try:
        from_file = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
    finally:
        dotenv_log.removeFilter(naming)
    return Environment(
        {**from_file, **environ}, set(from_file) - set(environ), os.fspath(dotenv_path)
    )


def read(env: Mapping[str, str], name: str, parse: Callable[[str], T]) -> T:
    """Parse variable ``name`` (or its default); wrap a ValueError into a ConfigError."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if name not in DEFAULTS:
            state = "not set" if raw is None else "empty"
            if isinstance(env, Environment):
                state += env.origin(name)
            raise ConfigError(_required(name, parse, state))
        raw = DEFAULTS[name]
    try:
        return parse(raw.strip())
    except ValueError as exc:
        origin = env.origin(name) if isinstance(env, Environment) else ""
        raise ConfigError(
            f"{name}={_shown(name, raw)}{origin} is invalid: expected {exc}"
        ) from None


def _required(name: str, parse: Callable[[str], object], state: str) -> str:
    """The message for a required variable left out: what it is expected to hold."""
    try:
        parse("")
    except ValueError as exc:
        return f"{name} is required but {state}: expected {exc}"
    return f"{name} is required but {state}"


def shown_default(name: str) -> str:
    """The default of ``name`` fit for a log line (a password in the default URL hidden)."""
    return _shown(name, DEFAULTS[name])


def _shown(name: str, raw: str) -> str:
    """The value of ``name`` fit for an error message: bounded, and never a password."""
    if name in SECRETS:
        return "'***'"
    if name == RABBIT_URL:
        raw = ",".join(redact_url(url) for url in raw.split(","))
    return _bounded_repr(raw)


def _bounded_repr(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- secrets and TLS files: several variables that only make sense together ----------------


def read_secret(env: Mapping[str, str], name: str) -> str | None:
    """The secret ``name``, from the variable itself or from the file ``<name>_FILE`` names.

    Setting both is an error. The file's content is taken whole, minus one final line break.
    """
    file_var = name + FILE_SUFFIX
    direct, path = env.get(name, ""), env.get(file_var, "").strip()
    if direct and path:
        raise ConfigError(f"{name} and {file_var} are both set: set only one of them")
    if not path:
        return direct or None
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"{file_var}={_bounded_repr(path)} is invalid: expected a readable file ({reason})"
        ) from None
    secret = secret.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ConfigError(f"{file_var}={_bounded_repr(path)} is invalid: the file is empty")
    return secret


def read_rabbit_urls(env: Mapping[str, str]) -> tuple[str, ...]:
    """RABBIT_URL, each URL's password replaced by RABBIT_PASSWORD(_FILE) when that is set."""
    urls = read(env, RABBIT_URL, parse_rabbit_urls)
    password = read_secret(env, RABBIT_PASSWORD)
    if password is not None:
        replaced = []
        for url in urls:
            parts = urlsplit(url)
            if not parts.username:
                raise ConfigError(
                    f"{RABBIT_URL}={_shown(RABBIT_URL, url)} is invalid: expected a user name "
                    f"in every URL (amqps://user@host/vhost) when {RABBIT_PASSWORD} is set"
                )
            hostport = parts.netloc.rpartition("@")[2]
            netloc = f"{parts.username}:{quote(password, safe='')}@{hostport}"
            replaced.append(urlunsplit(parts._replace(netloc=netloc)))
        urls = tuple(replaced)
    return urls


def read_tls_files(env: Mapping[str, str], ca_var: str, cert_var: str, key_var: str) -> TlsFiles:
    """The CA, certificate and key files named by three variables, loaded once to check them."""
    files = TlsFiles(
        ca_file=env.get(ca_var, "").strip() or None,
        cert_file=env.get(cert_var, "").strip() or None,
        key_file=env.get(key_var, "").strip() or None,
    )
    if bool(files.cert_file) != bool(files.key_file):
        given, missing = (cert_var, key_var) if files.cert_file else (key_var, cert_var)
        raise ConfigError(f"{given} is set but {missing} is not: a client certificate needs both")
    if files.is_set:
        try:
            client_context(files)
        except TlsFileError as exc:
            name = {"ca": ca_var, "cert": cert_var, "key": key_var}[exc.which]
            path = {"ca": files.ca_file, "cert": files.cert_file, "key": files.key_file}[exc.which]
            raise ConfigError(
                f"{name}={_bounded_repr(path or '')} is invalid: expected {exc}"
            ) from None
    return files


def read_etcd_credentials(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    user = env.get(ETCD_USER, "").strip() or None
    password = read_secret(env, ETCD_PASSWORD)
    if bool(user) != bool(password):
        given, missing = (ETCD_USER, ETCD_PASSWORD) if user else (ETCD_PASSWORD, ETCD_USER)
        raise ConfigError(f"{given} is set but {missing} is not: etcd authentication needs both")
    return user, password


def is_etcd_secure(endpoints: tuple[tuple[str, str, int], ...], files: TlsFiles) -> bool:
    """Whether to use TLS to etcd; every endpoint must agree, so nothing falls back to plain."""
    schemes = {scheme for scheme, _, _ in endpoints}
    if "http" in schemes and ("https" in schemes or files.is_set):
        raise ConfigError(
            f"{ETCD_ENDPOINTS} names an http:// endpoint while TLS to etcd is asked for "
            f"(an https:// endpoint or {ETCD_CA_FILE}/{ETCD_CERT_FILE} set): use https:// "
            "for every endpoint, or no scheme"
        )
    return "https" in schemes or files.is_set


def check_rabbit_tls(urls: tuple[str, ...], files: TlsFiles) -> None:
    if not files.is_set:
        return
    for url in urls:
        if urlsplit(url).scheme != "amqps":
            raise ConfigError(
                f"{RABBIT_URL}={_shown(RABBIT_URL, url)} is invalid: expected amqps:// URLs only "
                f"when {RABBIT_CA_FILE} or {RABBIT_CERT_FILE} is set (a plain amqp:// URL would "
                "send the credentials unencrypted)"
            )


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
            raise ValueError(
                "AMQP URLs with a numeric port between 0 and 65535 (percent-encode any "
                "'/', '?', '#' or '@' in the user name or password)"
            ) from None
    return urls


def parse_endpoints(raw: str) -> tuple[tuple[str, str, int], ...]:
    """(scheme, host, port) per endpoint; the scheme is "" when none was written."""
    endpoints = []
    for item in raw.split(","):
        scheme, sep, rest = item.strip().rpartition("://")
        if sep and scheme not in ("http", "https"):
            raise ValueError("comma-separated [http:// or https://]host:port, e.g. localhost:2379")
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ValueError("comma-separated [http:// or https://]host:port, e.g. localhost:2379")
        endpoints.append((scheme, host.strip("[]"), parse_port(port)))
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


def parse_lines_per_second(raw: str) -> int:
    if not _is_decimal(raw) or int(raw) > 1_000_000:
        raise ValueError("a whole number of lines a second, 0 (no cap) to 1000000")
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
