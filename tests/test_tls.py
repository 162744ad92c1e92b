"""The service over TLS and with credentials, against real servers the tests configure.

A RabbitMQ node of our own listens only for AMQP over TLS and demands a client certificate; one
etcd listens on https and demands a client certificate, another has authentication on. A
certificate or password that does not check out must stop the service from consuming, with an
ERROR line that names the server and the reason, and must never be worked around.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    ServiceProcess,
    StatsdListener,
    base_environment,
    restart_etcd,
    unique_name,
)
from tests.tls_servers import UNNAMED_LOOPBACK, TlsPublisher

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]


def broker_settings(node: Any, tls: Any, vhost: str, tmp_path: Path) -> dict[str, str]:
    """Mutual TLS to the node, the password from a file instead of the URL."""
    password_file = tmp_path / "rabbit-password"
    password_file.write_text(node.password + "\n")
    return {
        "RABBIT_URL": f"amqps://{node.user}@localhost:{node.port}/{vhost}",
        "RABBIT_PASSWORD_FILE": str(password_file),
        "RABBIT_CA_FILE": str(tls.ca.cert_file),
        "RABBIT_CERT_FILE": str(tls.client.cert_file),
        "RABBIT_KEY_FILE": str(tls.client.key_file),
    }


def etcd_tls_settings(etcd: Any, tls: Any) -> dict[str, str]:
    return {
        "ENABLE_ETCD": "true",
        "ETCD_ENDPOINTS": f"https://{etcd.endpoint}",
        "ETCD_CA_FILE": str(tls.ca.cert_file),
        "ETCD_CERT_FILE": str(tls.client.cert_file),
        "ETCD_KEY_FILE": str(tls.client.key_file),
    }


def assert_never_consumes(proc: ServiceProcess, refusal: str) -> str:
    """Wait for the refusal line; then the service must refuse again, never consuming."""
    line = proc.wait_for_line(refusal, timeout=30)
    proc.wait_for_line(refusal, timeout=30, count=2)
    assert proc.is_running(), f"the service exited instead of retrying:\n{proc.tail()}"
    assert proc.count("consuming from") == 0, proc.tail()
    assert " ERROR " in line, line
    return line


@pytest.fixture
def tls_vhost(rabbit_tls_node: Any) -> str:
    name = f"tls-{uuid.uuid4().hex[:8]}"
    rabbit_tls_node.add_vhost(name)
    return name


@pytest.fixture
def tls_publisher(rabbit_tls_node: Any, tls_material: Any, tls_vhost: str) -> Any:
    publisher = TlsPublisher(rabbit_tls_node, tls_vhost, tls_material.client)
    yield publisher
    publisher.close()


def test_service_consumes_and_deduplicates_over_mutual_tls_to_broker_and_etcd(
    run_service: Callable[..., ServiceProcess],
    rabbit_tls_node: Any,
    tls_etcd: Any,
    tls_material: Any,
    tls_vhost: str,
    tls_publisher: Any,
    statsd_listener: StatsdListener,
    tmp_path: Path,
) -> None:
    name = unique_name("tls")
    proc = run_service(
        name,
        **broker_settings(rabbit_tls_node, tls_material, tls_vhost, tmp_path),
        **etcd_tls_settings(tls_etcd, tls_material),
    )
    tls_publisher.publish_orders(["a-1", "a-1", "a-2"])

    assert statsd_listener.wait_for(f"{name}_new_order_ok", 2) == 2
    assert statsd_listener.wait_for(f"{name}_new_order_skipped", 1) == 1
    value, _ = tls_etcd.client().get(f"/service/{name}/a-1")
    assert value == b"true"
    assert "rabbit_url=amqps://svc-user:***@localhost" in proc.text()


def test_broker_refuses_a_client_without_certificate(
    run_service: Callable[..., ServiceProcess],
    rabbit_tls_node: Any,
    tls_material: Any,
    tls_vhost: str,
    tmp_path: Path,
) -> None:
    settings = broker_settings(rabbit_tls_node, tls_material, tls_vhost, tmp_path)
    del settings["RABBIT_CERT_FILE"], settings["RABBIT_KEY_FILE"]
    proc = run_service(unique_name("nocert"), wait_ready=False, **settings)

    line = assert_never_consumes(proc, "TLS handshake refused by RabbitMQ")
    assert f"amqps://svc-user:***@localhost:{rabbit_tls_node.port}/{tls_vhost}" in line
    assert "client certificate" in line


def test_broker_refuses_a_client_certificate_from_another_ca(
    run_service: Callable[..., ServiceProcess],
    rabbit_tls_node: Any,
    tls_material: Any,
    tls_vhost: str,
    tmp_path: Path,
) -> None:
    settings = broker_settings(rabbit_tls_node, tls_material, tls_vhost, tmp_path)
    settings["RABBIT_CERT_FILE"] = str(tls_material.other_client.cert_file)
    settings["RABBIT_KEY_FILE"] = str(tls_material.other_client.key_file)
    proc = run_service(unique_name("intruder"), wait_ready=False, **settings)

    line = assert_never_consumes(proc, "TLS handshake refused by RabbitMQ")
    assert "the server did not accept our client certificate" in line


def test_broker_certificate_from_an_untrusted_ca_is_refused(
    run_service: Callable[..., ServiceProcess],
    rabbit_tls_node: Any,
    tls_material: Any,
    tls_vhost: str,
    tmp_path: Path,
) -> None:
    settings = broker_settings(rabbit_tls_node, tls_material, tls_vhost, tmp_path)
    settings["RABBIT_CA_FILE"] = str(tls_material.other_ca.cert_file)
    proc = run_service(unique_name("badca"), wait_ready=False, **settings)

    line = assert_never_consumes(proc, "TLS handshake refused by RabbitMQ")
    assert f"amqps://svc-user:***@localhost:{rabbit_tls_node.port}/" in line
    assert "certificate verify failed" in line


def test_broker_certificate_for_another_host_name_is_refused(
    run_service: Callable[..., ServiceProcess],
    rabbit_tls_node: Any,
    tls_material: Any,
    tls_vhost: str,
    tmp_path: Path,
) -> None:
    settings = broker_settings(rabbit_tls_node, tls_material, tls_vhost, tmp_path)
    settings["RABBIT_URL"] = settings["RABBIT_URL"].replace("@localhost:", f"@{UNNAMED_LOOPBACK}:")
    proc = run_service(unique_name("badhost"), wait_ready=False, **settings)

    line = assert_never_consumes(proc, "TLS handshake refused by RabbitMQ")
    assert f"amqps://svc-user:***@{UNNAMED_LOOPBACK}:{rabbit_tls_node.port}/" in line
    assert "certificate verify failed: IP address mismatch" in line


def test_etcd_certificate_from_an_untrusted_ca_is_refused(
    run_service: Callable[..., ServiceProcess],
    rabbit_tls_node: Any,
    tls_etcd: Any,
    tls_material: Any,
    tls_vhost: str,
    tmp_path: Path,
) -> None:
    settings = {
        **broker_settings(rabbit_tls_node, tls_material, tls_vhost, tmp_path),
        **etcd_tls_settings(tls_etcd, tls_material),
        "ETCD_CA_FILE": str(tls_material.other_ca.cert_file),
        "ETCD_TIMEOUT": "2",
    }
    proc = run_service(unique_name("etcdca"), wait_ready=False, **settings)

    line = assert_never_consumes(proc, f"refused by https://{tls_etcd.endpoint}")
    assert "CERTIFICATE_VERIFY_FAILED" in line.upper().replace(" ", "_"), line


def test_etcd_refuses_a_client_without_certificate(
    run_service: Callable[..., ServiceProcess],
    rabbit_tls_node: Any,
    tls_etcd: Any,
    tls_material: Any,
    tls_vhost: str,
    tmp_path: Path,
) -> None:
    settings = {
        **broker_settings(rabbit_tls_node, tls_material, tls_vhost, tmp_path),
        **etcd_tls_settings(tls_etcd, tls_material),
        "ETCD_TIMEOUT": "2",
    }
    del settings["ETCD_CERT_FILE"], settings["ETCD_KEY_FILE"]
    proc = run_service(unique_name("etcdnocert"), wait_ready=False, **settings)

    line = assert_never_consumes(proc, f"refused by https://{tls_etcd.endpoint}")
    # etcd (Go's TLS) answers a missing client certificate with a "bad certificate" alert.
    assert "ALERT_BAD_CERTIFICATE" in line, line
    assert "check ETCD_CA_FILE, ETCD_CERT_FILE and ETCD_KEY_FILE" in line


def test_etcd_user_and_password_from_a_file_work_across_a_restart_and_a_void_token(
    run_service: Callable[..., ServiceProcess],
    auth_etcd: Any,
    publisher: Any,
    statsd_listener: StatsdListener,
    tmp_path: Path,
) -> None:
    """etcd may forget or void a token (restart, password change): the service logs in again."""
    password_file = tmp_path / "etcd-password"
    password_file.write_text(auth_etcd.password)
    name = unique_name("auth")
    proc = run_service(
        name,
        ENABLE_ETCD="true",
        ETCD_ENDPOINTS=auth_etcd.endpoint,
        ETCD_USER=auth_etcd.user,
        ETCD_PASSWORD_FILE=str(password_file),
    )
    publisher.publish_orders(["b-1", "b-1"])
    assert statsd_listener.wait_for(f"{name}_new_order_ok", 1) == 1
    assert statsd_listener.wait_for(f"{name}_new_order_skipped", 1) == 1

    restart_etcd(auth_etcd)
    publisher.publish_orders(["b-2", "b-1"])
    assert statsd_listener.wait_for(f"{name}_new_order_ok", 2, timeout=60) == 2
    assert statsd_listener.wait_for(f"{name}_new_order_skipped", 2) == 2
    logins = proc.count(f"logged in to etcd at http://{auth_etcd.endpoint} as svc-user")

    auth_etcd.set_password_again()
    publisher.publish_orders(["b-3"])

    assert statsd_listener.wait_for(f"{name}_new_order_ok", 3, timeout=60) == 3
    value, _ = auth_etcd.client().get(f"/service/{name}/b-3")
    assert value == b"true"
    assert proc.count(f"logged in to etcd at http://{auth_etcd.endpoint} as svc-user") == logins + 1


def test_wrong_etcd_password_is_refused_clearly(
    run_service: Callable[..., ServiceProcess], auth_etcd: Any
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    proc = run_service(
        unique_name("badpw"),
        wait_ready=False,
        ENABLE_ETCD="true",
        ETCD_ENDPOINTS=auth_etcd.endpoint,
        ETCD_USER=auth_etcd.user,
        ETCD_PASSWORD=wrong,
    )

    line = assert_never_consumes(proc, f"refused by http://{auth_etcd.endpoint}")
    assert "authentication failed" in line
    assert "ETCD_PASSWORD" in line
    assert wrong not in proc.text()


def test_publish_command_uses_the_same_tls_settings(
    rabbit_tls_node: Any, tls_material: Any, tls_vhost: str, tls_publisher: Any
) -> None:
    tls_publisher.declare_topology("pubtls")
    env = {
        **base_environment(),
        "RABBIT_CA_FILE": str(tls_material.ca.cert_file),
        "RABBIT_CERT_FILE": str(tls_material.client.cert_file),
        "RABBIT_KEY_FILE": str(tls_material.client.key_file),
    }
    command = [sys.executable, "-m", "svc.publish", "--url", rabbit_tls_node.url(tls_vhost)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert tls_publisher.ready_count("pubtls-queue") == 1

    env["RABBIT_CA_FILE"] = str(tls_material.other_ca.cert_file)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "certificate verify failed" in done.stderr
    assert rabbit_tls_node.password not in done.stderr + done.stdout
