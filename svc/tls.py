"""TLS for the broker and etcd connections: certificate files, checked once at start-up.

What it guarantees: a TLS connection made from these settings always verifies the server's
certificate chain and host name, against the given CA bundle or else the system's CA store.
There is no setting that turns verification off, and nothing falls back to plain text.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
import pika


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The PEM files of one connection; ``None`` where not given."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def is_set(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def describe(self) -> str:
        parts = [f"ca={self.ca_file or 'system'}"]
        if self.cert_file:
            parts.append(f"client_cert={self.cert_file}")
        return ",".join(parts)


class TlsFileError(ValueError):
    """A TLS file is unusable; ``which`` says which of ca/cert/key, the message what is wrong."""

    def __init__(self, which: str, expected: str) -> None:
        super().__init__(expected)
        self.which = which


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """An SSL context that verifies the server and presents the client certificate, if any.

    Raises TlsFileError for a missing, unreadable or malformed file.
    """
    try:
        context = ssl.create_default_context(cafile=files.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(
            "ca", f"a readable PEM file of CA certificates ({_reason(exc)})"
        ) from None
    if files.cert_file and files.key_file:
        _readable("cert", files.cert_file)
        _readable("key", files.key_file)
        try:
            context.load_cert_chain(files.cert_file, files.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(
                "cert", f"a PEM certificate that matches the key in the key file ({_reason(exc)})"
            ) from None
    return context


def grpc_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """gRPC channel credentials for etcd: its CA (else gRPC's default roots), client pair."""
    ca = _read_bytes(files.ca_file) if files.ca_file else None
    cert = _read_bytes(files.cert_file) if files.cert_file else None
    key = _read_bytes(files.key_file) if files.key_file else None
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def broker_parameters(url: str, context: ssl.SSLContext | None) -> pika.URLParameters:
    """pika parameters for ``url``; an ``amqps://`` URL verifies the broker with ``context``."""
    params = pika.URLParameters(url)
    if urlsplit(url).scheme == "amqps":
        # server_hostname: the host name the certificate must carry, as written in the URL.
        params.ssl_options = pika.SSLOptions(
            context or ssl.create_default_context(), server_hostname=params.host
        )
    return params


def _innermost_cause(error: BaseException) -> BaseException:
    """The innermost cause of a failed pika connection attempt (a refusal, a TLS error).

    pika wraps it in layers: a workflow failure holds each attempt's error, a phase's error
    holds the exception that ended the phase, and a connection error may carry either.
    """
    cause = error
    for _ in range(5):
        exceptions = getattr(cause, "exceptions", None)
        inner = exceptions[-1] if exceptions else getattr(cause, "exception", None)
        if inner is None and cause.args and isinstance(cause.args[0], BaseException):
            inner = cause.args[0]
        if not isinstance(inner, BaseException):
            break
        cause = inner
    return cause


def describe_connect_error(error: BaseException | str) -> str:
    """Why a connection attempt failed, in a line: the TLS reason, or the innermost error."""
    if isinstance(error, str):
        return error
    cause = _innermost_cause(error)
    if isinstance(cause, ssl.SSLError):
        return describe_handshake_error(cause)
    return str(cause) or repr(cause)


def describe_handshake_error(exc: BaseException) -> str:
    """A short reason for a failed TLS handshake, with the fix when there is an obvious one."""
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if "CERTIFICATE_REQUIRED" in text:
        return "the server demands a client certificate (set RABBIT_CERT_FILE and RABBIT_KEY_FILE)"
    for alert in ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN"):
        if alert in text:
            return (
                f"the server did not accept our client certificate ({alert.lower()}; check "
                "RABBIT_CERT_FILE and RABBIT_KEY_FILE)"
            )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or text}"
    return text


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _readable(which: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsFileError(which, f"a readable file ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return type(exc).__name__
