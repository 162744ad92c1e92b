"""Fixtures for the tests that run against real servers: etcd, a RabbitMQ vhost, statsd, svc.

Each fixture registers its cleanup right after it makes its resource, so a failing set-up step
still leaves nothing behind. On a failing test, the log tail of every daemon it started is printed
in the teardown section of the report.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    amqp_url,
    rabbitmqctl,
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the whole run; tests keep apart by using unique service names."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], EtcdServer]]:
    """Start private etcd servers, for tests that stop or kill theirs; all stopped at the end."""
    servers: list[EtcdServer] = []

    def start() -> EtcdServer:
        server = EtcdServer(tmp_path_factory.mktemp("etcd-private"))
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def vhost(request: pytest.FixtureRequest) -> str:
    """A fresh RabbitMQ vhost for this test only; yields its AMQP URL (guest/guest)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    request.addfinalizer(lambda: rabbitmqctl("delete_vhost", name))
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return amqp_url(name)


@pytest.fixture
def statsd_listener() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


@pytest.fixture
def publisher(vhost: str) -> Iterator[Publisher]:
    """A confirming publisher connected to this test's vhost."""
    pub = Publisher(vhost)
    yield pub
    pub.close()


@pytest.fixture
def run_service(
    request: pytest.FixtureRequest, vhost: str, statsd_listener: StatsdListener, tmp_path: Path
) -> Callable[..., ServiceProcess]:
    """Start ``python -m svc`` for a service name, pointed at this test's vhost and statsd.

    Keyword arguments are settings (``ENABLE_ETCD="true"``); ``None`` removes one, and a name of
    ``None`` leaves SERVICE_NAME unset. The process runs in a fresh working dir unless ``cwd`` is
    given, so no stray ``.env`` is read; it is killed at teardown. ``on_line(proc, line)`` is
    called on the log reader thread for each line, from the very first one.
    """
    started: list[ServiceProcess] = []

    def report() -> None:
        if _test_failed(request):
            for proc in started:
                print(f"----- {proc.label} (pid {proc.process and proc.pid}) log tail -----")
                print(proc.tail(60))
        for number, proc in enumerate(started, 1):
            (tmp_path / f"{number}-{proc.label}.log").write_text(proc.text())

    def cleanup() -> None:
        for proc in started:
            proc.cleanup()

    request.addfinalizer(cleanup)
    request.addfinalizer(report)

    def start(
        name: str | None,
        *,
        wait_ready: bool = True,
        cwd: Path | None = None,
        on_line: Callable[[ServiceProcess, str], None] | None = None,
        **settings: str | None,
    ) -> ServiceProcess:
        env = {
            "SERVICE_NAME": name,
            "RABBIT_URL": vhost,
            "STATSD_HOST": "127.0.0.1",
            "STATSD_PORT": str(statsd_listener.port),
            "ENABLE_ETCD": "false",
            "ETCD_TIMEOUT": "5",
            "DEDUP_CLAIM_TTL": "3",
            "LOG_LEVEL": "INFO",
            **settings,
        }
        proc = ServiceProcess(
            {k: v for k, v in env.items() if v is not None}, cwd=cwd, label=name or "svc"
        )
        started.append(proc)
        if on_line is not None:
            proc.on_line.append(lambda line: on_line(proc, line))
        proc.start()
        if wait_ready:
            proc.wait_ready()
        return proc

    return start


@pytest.fixture
def run_dedup_service(
    run_service: Callable[..., ServiceProcess], etcd_server: EtcdServer
) -> Callable[..., ServiceProcess]:
    """Like ``run_service``, with ENABLE_ETCD=true against the session's etcd."""

    def start(name: str, **options: Any) -> ServiceProcess:
        defaults = {"ENABLE_ETCD": "true", "ETCD_ENDPOINTS": etcd_server.endpoint}
        return run_service(name, **{**defaults, **options})

    return start


# --- TLS and credentials (tests/test_tls.py, tests/test_secrets.py) --------------------------


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A CA with server and client certificates for loopback, and a second, unrelated CA."""
    from tests.tls_servers import TlsMaterial

    return TlsMaterial(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def rabbit_tls_node(tmp_path_factory: pytest.TempPathFactory, tls_material: Any) -> Iterator[Any]:
    """One RabbitMQ node of our own with a mutual-TLS listener, shared by the TLS tests."""
    from tests.tls_servers import RabbitTlsNode

    node = RabbitTlsNode(
        tmp_path_factory.mktemp("rabbit-tls"), tls_material.ca, tls_material.server
    )
    try:
        node.start()
        print(f"RabbitMQ TLS node {node.node} started in {node.started_in_seconds:.1f} s")
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An etcd with authentication on (root and one service user)."""
    from tests.tls_servers import AuthEtcdServer

    server = AuthEtcdServer(tmp_path_factory.mktemp("etcd-auth"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, tls_material: Any) -> Iterator[Any]:
    """An etcd on https that demands a client certificate signed by the test CA."""
    from tests.tls_servers import SecureEtcdServer

    server = SecureEtcdServer(
        tmp_path_factory.mktemp("etcd-tls"),
        tls_material.ca,
        tls_material.server,
        tls_material.client,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
