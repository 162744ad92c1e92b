"""Checks of docker-compose.yaml and the assets/ files it mounts, without a Docker engine.

``docker-compose config -q`` validates the file against the Compose schema; the other tests read
the YAML and the mounted files for what a user of the stack relies on: the three services, the
ports the daemon and the Graphite UI are reached on, statsd flushing every second and Graphite
keeping one-second points for what statsd writes.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"

STATSD_CONFIG_TARGET = "/opt/statsd/config/udp.js"
STORAGE_SCHEMAS_TARGET = "/opt/graphite/conf/storage-schemas.conf"
# Names statsd's Graphite backend writes for a counter (legacy namespace): count and rate.
STATSD_SERIES = ("stats_counts.orders_new_order_ok", "stats.orders_new_order_ok")

# service -> {(published port, container port, protocol)} that users and the daemon rely on.
EXPECTED_PORTS = {
    "rabbitmq": {(5672, 5672, "tcp"), (15672, 15672, "tcp")},
    "etcd": {(2379, 2379, "tcp")},
    "graphite": {
        (80, 80, "tcp"),
        (2003, 2003, "tcp"),
        (2004, 2004, "tcp"),
        (8125, 8125, "udp"),
        (8126, 8126, "tcp"),
    },
}
LOOPBACK = "127.0.0.1"
# Seconds per unit in a carbon retention such as "1s:6h,1m:7d"; a bare number means seconds.
RETENTION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
# docker-compose 1.x loads its Python stack on every call; this bounds a wedged run only.
COMPOSE_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as file:
        return yaml.safe_load(file)


def find_docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail("docker-compose is not installed, so docker-compose.yaml cannot be validated. "
                    "Install it with `apt-get install docker-compose` (Debian/Ubuntu; CI does "
                    "the same), then run the tests again.")
    return path


def parse_port(spec: str | int | dict[str, Any]) -> list[tuple[str | None, int | None, int, str]]:
    """Expand one `ports:` entry into (host IP, published, container port, protocol) tuples.

    Handles the long syntax and the short one: ``[IP:][HOST[-HOST]:]CONTAINER[-CONTAINER][/PROTO]``
    (an IPv6 host address is not supported).
    """
    if isinstance(spec, dict):
        published = spec.get("published")
        return [(spec.get("host_ip"), int(published) if published is not None else None,
                 int(spec["target"]), spec.get("protocol", "tcp"))]
    text, _, protocol = str(spec).partition("/")
    parts = text.rsplit(":", 2)
    host_ip = parts[0] if len(parts) == 3 else None
    containers = expand_range(parts[-1])
    if len(parts) == 1:
        return [(None, None, port, protocol or "tcp") for port in containers]
    hosts = expand_range(parts[-2])
    pairs = zip(hosts, containers, strict=True)  # "2003-2004:2003" is an error, not a port
    return [(host_ip, host, port, protocol or "tcp") for host, port in pairs]


def expand_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, int | None, int, str]]:
    return [port for spec in service.get("ports", []) for port in parse_port(spec)]


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Return {container path: host path} for the service's bind mounts (not named volumes)."""
    mounts = {}
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            if spec.get("type") == "bind":
                mounts[spec["target"]] = spec["source"]
            continue
        source, target = spec.split(":")[:2]
        # A named volume is a bare name; a bind mount source is a path.
        if source.startswith((".", "/", "~")):
            mounts[target] = source
    return mounts


def mounted_file(compose: dict[str, Any], target: str) -> Path:
    mounts = bind_mounts(compose["services"]["graphite"])
    assert target in mounts, f"graphite does not mount anything at {target}; mounts: {mounts}"
    return (REPO / mounts[target]).resolve()


def retention_seconds(text: str) -> int:
    match = re.fullmatch(r"(\d+)([a-z]*)", text.strip())
    assert match, f"unreadable retention {text!r}"
    number, unit = match.groups()
    return int(number) * RETENTION_UNITS[unit or "s"]


def finest_precision_seconds(schemas: configparser.ConfigParser, metric: str) -> int:
    """Resolution carbon gives a new series ``metric``: the first matching section wins."""
    for name in schemas.sections():
        if re.search(schemas[name]["pattern"], metric):
            first_archive = schemas[name]["retentions"].split(",")[0]
            return retention_seconds(first_archive.split(":")[0])
    pytest.fail(f"no section of storage-schemas.conf matches {metric}")


def test_docker_compose_config_accepts_the_file() -> None:
    result = subprocess.run(
        [find_docker_compose(), "-f", COMPOSE_FILE.name, "config", "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_SECONDS)
    assert result.returncode == 0, f"docker-compose config rejected the file:\n{result.stderr}"


def test_defines_rabbitmq_etcd_and_graphite(compose: dict[str, Any]) -> None:
    assert {"rabbitmq", "etcd", "graphite"} <= set(compose["services"])


@pytest.mark.parametrize("service", sorted(EXPECTED_PORTS))
def test_publishes_the_ports_clients_use(compose: dict[str, Any], service: str) -> None:
    published = {(host, target, protocol)
                 for _, host, target, protocol in published_ports(compose["services"][service])}
    missing = EXPECTED_PORTS[service] - published
    assert not missing, f"{service} does not publish {sorted(missing)}; it publishes {published}"


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    # guest/guest on RabbitMQ, no auth on etcd, root/root on Graphite's admin: not for the LAN.
    exposed = [(name, port) for name, service in compose["services"].items()
               for port in published_ports(service) if port[0] != LOOPBACK]
    assert not exposed, f"ports published beyond {LOOPBACK}: {exposed}"


def test_rabbitmq_image_has_the_management_ui(compose: dict[str, Any]) -> None:
    assert "management" in compose["services"]["rabbitmq"]["image"]


def test_etcd_is_3_5_listening_on_all_interfaces_and_advertising_localhost(
        compose: dict[str, Any]) -> None:
    etcd = compose["services"]["etcd"]
    assert re.search(r"etcd:v3\.5\.\d+$", etcd["image"]), etcd["image"]
    command = etcd["command"]
    command = command.split() if isinstance(command, str) else command
    assert "--listen-client-urls=http://0.0.0.0:2379" in command
    assert "--advertise-client-urls=http://localhost:2379" in command


def test_mounted_files_exist_in_the_repository(compose: dict[str, Any]) -> None:
    mounts = {(name, target, source) for name, service in compose["services"].items()
              for target, source in bind_mounts(service).items()}
    assert {target for _, target, _ in mounts} >= {STATSD_CONFIG_TARGET, STORAGE_SCHEMAS_TARGET}
    # A missing source would make Docker create an empty directory in its place.
    missing = [(name, source) for name, _, source in mounts if not (REPO / source).is_file()]
    assert not missing, f"mounted files missing from the repository: {missing}"


def test_statsd_flushes_every_second(compose: dict[str, Any]) -> None:
    text = mounted_file(compose, STATSD_CONFIG_TARGET).read_text()
    # statsd reads any JavaScript object literal; we keep the file plain JSON so it is checkable.
    config = json.loads(text)
    assert config["flushInterval"] == 1000


def test_statsd_files_counters_under_stats_counts(compose: dict[str, Any]) -> None:
    config = json.loads(mounted_file(compose, STATSD_CONFIG_TARGET).read_text())
    # The README points at Metrics/stats_counts/...; statsd puts counters there only with the
    # legacy namespace, which is its default.
    assert config.get("graphite", {}).get("legacyNamespace", True) is True
    assert config.get("backends", ["./backends/graphite"]) == ["./backends/graphite"]


@pytest.mark.parametrize("metric", STATSD_SERIES)
def test_storage_schema_keeps_one_second_points_for_stats(
        compose: dict[str, Any], metric: str) -> None:
    schemas = configparser.ConfigParser(interpolation=None)
    schemas.read_string(mounted_file(compose, STORAGE_SCHEMAS_TARGET).read_text())
    assert finest_precision_seconds(schemas, metric) == 1

