"""No password, private key or auth token in any log line or metric, at DEBUG, in a full run.

The run: a service with every credential set (broker password, client certificate and key,
etcd user and password) starts, warms up, consumes good, repeated, unknown and bad events,
rides out an etcd restart and a password change that voids its auth token, and stops;
beside it, services with a wrong etcd password and a wrong broker password keep being
refused. Everything they print and every statsd packet they send is then searched for the
secrets.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pyetcd
import pytest

from tests.support import ServiceProcess, StatsdListener, restart_etcd, unique_name
from tests.tls_servers import TlsPublisher

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

# etcd's simple tokens: 16 random letters, a dot, a number.
ETCD_TOKEN_RE = re.compile(r"[A-Za-z]{16}\.[0-9]+")


class RecordingStatsdListener(StatsdListener):
    """A statsd listener that also keeps every packet as received."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        super().__init__()

    def _record(self, data: bytes) -> None:
        self.raw.append(data)
        super()._record(data)


@pytest.fixture
def statsd_listener() -> Iterator[RecordingStatsdListener]:
    listener = RecordingStatsdListener()
    yield listener
    listener.close()


def a_real_token(etcd: Any) -> str:
    """Log in as the service user once, to show what a token looks like."""
    client = pyetcd.MultiEndpointEtcd3Client(
        endpoints=[pyetcd.Endpoint("127.0.0.1", etcd.client_port, secure=False)], timeout=10
    )
    try:
        request = pyetcd.etcdrpc.AuthenticateRequest(name=etcd.user, password=etcd.password)
        return str(client.authstub.Authenticate(request, 10).token)
    finally:
        client.close()


def test_no_secret_in_logs_or_metrics_of_a_full_debug_run(
    run_service: Callable[..., ServiceProcess],
    rabbit_tls_node: Any,
    auth_etcd: Any,
    tls_material: Any,
    statsd_listener: RecordingStatsdListener,
) -> None:
    vhost = rabbit_tls_node.add_vhost(f"secrets-{uuid.uuid4().hex[:8]}")
    broker = {
        "RABBIT_URL": f"amqps://{rabbit_tls_node.user}@localhost:{rabbit_tls_node.port}/{vhost}",
        "RABBIT_PASSWORD": rabbit_tls_node.password,
        "RABBIT_CA_FILE": str(tls_material.ca.cert_file),
        "RABBIT_CERT_FILE": str(tls_material.client.cert_file),
        "RABBIT_KEY_FILE": str(tls_material.client.key_file),
    }
    etcd = {
        "ENABLE_ETCD": "true",
        "ETCD_ENDPOINTS": auth_etcd.endpoint,
        "ETCD_USER": auth_etcd.user,
        "ETCD_PASSWORD": auth_etcd.password,
    }
    wrong_etcd_password = f"wrong-etcd-{uuid.uuid4().hex}"
    wrong_rabbit_password = f"wrong-amqp-{uuid.uuid4().hex}"
    name = unique_name("secrets")
    debug = {"LOG_LEVEL": "DEBUG", "SUMMARY_INTERVAL": "1"}

    service = run_service(name, **broker, **etcd, **debug)
    refused_etcd = run_service(
        unique_name("badetcd"),
        wait_ready=False,
        **broker,
        **{**etcd, "ETCD_PASSWORD": wrong_etcd_password},
        **debug,
    )
    refused_broker = run_service(
        unique_name("badamqp"),
        wait_ready=False,
        **{**broker, "RABBIT_PASSWORD": wrong_rabbit_password},
        **debug,
    )
    publisher = TlsPublisher(rabbit_tls_node, vhost, tls_material.client)
    try:
        publisher.publish_orders(["s-1", "s-2", "s-1"])
        publisher.publish({"type": "refund", "id": "s-3"})
        publisher.publish(b"{not json")
        statsd_listener.wait_for(f"{name}_new_order_ok", 2)
        statsd_listener.wait_for(f"{name}_invalid", 1)
        restart_etcd(auth_etcd)
        auth_etcd.set_password_again()  # voids the token: the service logs in again
        publisher.publish_orders(["s-4", "s-2"])
        statsd_listener.wait_for(f"{name}_new_order_ok", 3, timeout=60)
        statsd_listener.wait_for(f"{name}_new_order_skipped", 2)
    finally:
        publisher.close()
    refused_etcd.wait_for_line("etcd login as svc-user refused", count=2)
    refused_broker.wait_for_line("ACCESS_REFUSED", count=2)
    service.wait_for_line(" s: ")  # a summary line
    assert service.terminate() == 0
    refused_etcd.terminate()
    refused_broker.terminate()

    # The run did what it should, so the search below covers every path named above.
    assert service.count("logged in to etcd") >= 2, service.tail()
    assert service.count("DEBUG") > 0
    assert service.count("dead-lettered tag=") == 1
    outputs = {p.label: p.text() for p in (service, refused_etcd, refused_broker)}
    packets = b"\n".join(statsd_listener.raw).decode("utf-8", "replace")
    secrets = {
        "broker password": rabbit_tls_node.password,
        "broker password, URL-encoded": quote(rabbit_tls_node.password, safe=""),
        "etcd password": auth_etcd.password,
        "etcd root password": auth_etcd.root_password,
        "wrong etcd password": wrong_etcd_password,
        "wrong broker password": wrong_rabbit_password,
    }
    key_lines = [
        line
        for line in tls_material.client.key_file.read_text().splitlines()
        if not line.startswith("-----")
    ]
    assert key_lines and ETCD_TOKEN_RE.fullmatch(a_real_token(auth_etcd))
    for where, text in [*outputs.items(), ("statsd packets", packets)]:
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in {where}"
        for line in key_lines:
            assert line not in text, f"private key material appears in {where}"
        assert "PRIVATE KEY" not in text, where
        tokens = ETCD_TOKEN_RE.findall(text)
        assert not tokens, f"something like an etcd auth token appears in {where}: {tokens}"
