"""The exceptions the service raises, and what the code that catches each one must do."""


class ServiceError(Exception):
    """Root of every error this service raises on purpose."""


class ConfigError(ServiceError):
    """A setting is missing or malformed; the process must exit with status 2."""


class PermanentError(ServiceError):
    """A delivery can never succeed as it is; the catcher dead-letters it, then acks it.

    ``code`` is a short, fixed word (safe for headers and logs); ``detail`` explains it.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class TransientError(ServiceError):
    """A dependency did not answer; the delivery in hand must stay unacked and be retried."""


class StoreUnavailable(TransientError):
    """etcd did not answer in time; nothing may be acked until it does."""


class StoreRefused(StoreUnavailable):
    """etcd refused our credentials or the TLS handshake failed verification.

    Retried like any outage (the operator may fix etcd's side without restarting us), but the
    catcher logs it at ERROR: it does not heal by itself.
    """


class BrokerRefused(TransientError):
    """The TLS handshake with every broker URL failed; retried with backoff, logged at ERROR."""


class TopologyError(ServiceError):
    """The broker refused our queues or exchange as declared; retrying cannot fix it."""
