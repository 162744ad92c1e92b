"""Checks of docker-compose.yaml, .env.example and the assets/ files, without a Docker engine.

``docker-compose config`` validates the file against the Compose schema and resolves it with
the variables of ``.env.example``, as a user's copy of it in ``.env`` would be; the tests read
that result and the mounted files for what a user of the stack relies on: the dependencies by
default and the service only with the ``app`` profile, settings the service really reads, no
guest account, ports on loopback only, statsd flushing every second and Graphite keeping
one-second points for what statsd writes.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values

from svc import config

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
# The variables .env.example sets for docker-compose; a test run must not take them from its
# own environment, where they would override the file's.
COMPOSE_VARIABLES = ("RABBITMQ_USER", "RABBITMQ_PASSWORD", "RABBIT_URL", "APP_ENABLE_ETCD")
DEPENDENCIES = {"rabbitmq", "etcd", "graphite"}
APP_SERVICES = {"orders", "notify"}
APP_PROFILE = "app"

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
    """The file as written (anchors and merge keys resolved by the YAML loader)."""
    with COMPOSE_FILE.open() as file:
        return yaml.safe_load(file)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The file as docker-compose resolves it with the variables of .env.example."""
    result = run_compose("--env-file", ENV_EXAMPLE.name, "--profile", APP_PROFILE, "config")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return {k: v for k, v in dotenv_values(ENV_EXAMPLE).items() if v is not None}


def run_compose(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES}
    return subprocess.run(
        [find_docker_compose(), "-f", COMPOSE_FILE.name, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMPOSE_TIMEOUT_SECONDS,
        check=False,
    )


def find_docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "docker-compose is not installed, so docker-compose.yaml cannot be validated. "
            "Install it with `apt-get install docker-compose` (Debian/Ubuntu; CI does "
            "the same), then run the tests again."
        )
    return path


def parse_port(spec: str | int | dict[str, Any]) -> list[tuple[str | None, int | None, int, str]]:
    """Expand one `ports:` entry into (host IP, published, container port, protocol) tuples.

    Handles the long syntax and the short one: ``[IP:][HOST[-HOST]:]CONTAINER[-CONTAINER][/PROTO]``
    (an IPv6 host address is not supported).
    """
    if isinstance(spec, dict):
        published = spec.get("published")
        return [
            (
                spec.get("host_ip"),
                int(published) if published is not None else None,
                int(spec["target"]),
                spec.get("protocol", "tcp"),
            )
        ]
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


def container_ports(service: dict[str, Any]) -> set[tuple[int, str]]:
    return {(target, protocol) for _, _, target, protocol in published_ports(service)}


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


@pytest.mark.parametrize("profile", [[], ["--profile", APP_PROFILE]], ids=["default", "app"])
def test_docker_compose_config_accepts_the_file(profile: list[str]) -> None:
    result = run_compose("--env-file", ENV_EXAMPLE.name, *profile, "config", "-q")
    assert result.returncode == 0, f"docker-compose config rejected the file:\n{result.stderr}"


def test_without_credentials_compose_stops_and_names_the_variable(tmp_path: Path) -> None:
    # A copy of the file where no .env exists, as in a fresh clone.
    shutil.copy(COMPOSE_FILE, tmp_path / COMPOSE_FILE.name)
    result = run_compose("config", "-q", cwd=tmp_path)
    assert result.returncode != 0
    assert "RABBITMQ_USER" in result.stderr and ".env.example" in result.stderr, result.stderr


def test_default_profile_has_only_the_dependencies(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert {name for name, service in services.items() if not service.get("profiles")} == (
        DEPENDENCIES
    )
    assert {name: services[name].get("profiles") for name in APP_SERVICES} == {
        name: [APP_PROFILE] for name in APP_SERVICES
    }


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_service_settings_are_valid_settings_of_the_service(
    resolved: dict[str, Any], name: str, tmp_path: Path
) -> None:
    environment = resolved["services"][name]["environment"]
    unknown = set(environment) - {config.SERVICE_NAME, *config.DEFAULTS}
    assert not unknown, f"{name} sets variables the service does not read: {sorted(unknown)}"

    # Parsed by the service's own settings code, with no .env of the test run's.
    settings = config.load_settings(environment, dotenv_path=tmp_path / "no.env")

    assert settings.service_name == name
    assert settings.enable_etcd is True
    [rabbit_url] = settings.rabbit_urls
    assert (urlsplit(rabbit_url).hostname, urlsplit(rabbit_url).port) == ("rabbitmq", 5672)
    assert settings.etcd_endpoints == (("etcd", 2379),)
    assert (settings.statsd_host, settings.statsd_port) == ("graphite", 8125)


def test_app_services_reach_the_ports_their_dependencies_listen_on(
    resolved: dict[str, Any],
) -> None:
    # Container to container: the targets (container ports), not the published ones.
    services = resolved["services"]
    assert (5672, "tcp") in container_ports(services["rabbitmq"])
    assert (2379, "tcp") in container_ports(services["etcd"])
    assert (8125, "udp") in container_ports(services["graphite"])


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_service_waits_for_a_healthy_broker_and_etcd(
    resolved: dict[str, Any], name: str
) -> None:
    services = resolved["services"]
    depends_on = services[name]["depends_on"]
    assert depends_on["rabbitmq"]["condition"] == "service_healthy"
    assert depends_on["etcd"]["condition"] == "service_healthy"
    assert "graphite" in depends_on
    assert services["rabbitmq"]["healthcheck"]["test"] and services["etcd"]["healthcheck"]["test"]


def test_app_services_share_one_image_built_from_the_dockerfile(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    builds = {name: Path(services[name]["build"]["context"]).resolve() for name in APP_SERVICES}
    assert set(builds.values()) == {REPO}
    assert (REPO / services["orders"]["build"].get("dockerfile", "Dockerfile")).is_file()
    assert services["orders"]["image"] == services["notify"]["image"]


def test_no_guest_credentials_the_broker_account_comes_from_env(
    resolved: dict[str, Any], example_env: dict[str, str]
) -> None:
    assert "guest" not in yaml.safe_dump(resolved)  # no value anywhere names that account
    user, password = example_env["RABBITMQ_USER"], example_env["RABBITMQ_PASSWORD"]
    assert "guest" not in (user, password)
    broker = resolved["services"]["rabbitmq"]["environment"]
    assert (broker["RABBITMQ_DEFAULT_USER"], broker["RABBITMQ_DEFAULT_PASS"]) == (user, password)
    for name in APP_SERVICES:
        url = urlsplit(resolved["services"][name]["environment"]["RABBIT_URL"])
        assert (url.username, url.password) == (user, password)


def test_env_example_values_fit_in_a_url_and_give_the_host_a_working_rabbit_url(
    example_env: dict[str, str], tmp_path: Path
) -> None:
    user, password = example_env["RABBITMQ_USER"], example_env["RABBITMQ_PASSWORD"]
    assert re.fullmatch(r"[A-Za-z0-9._-]+", user) and re.fullmatch(r"[A-Za-z0-9._-]+", password)
    # A service started on the host in the repository reads .env; here, the example's copy.
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    settings = config.load_settings({"SERVICE_NAME": "orders"}, dotenv_path=tmp_path / ".env")
    assert settings.rabbit_urls == (f"amqp://{user}:{password}@localhost:5672/%2F",)
    assert settings.enable_etcd is False  # the compose-only APP_ENABLE_ETCD does not leak in
    # The README's way to export it for the tools that read only the environment.
    exported = subprocess.run(
        ["bash", "-c", 'set -a; . "$0"; set +a; printf %s "$RABBIT_URL"', str(ENV_EXAMPLE)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert exported.stdout == settings.rabbit_urls[0]


def test_env_file_is_kept_out_of_git_and_of_the_image() -> None:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run([git, "check-ignore", "-q", ".env"], cwd=REPO, check=False)
    assert ignored.returncode == 0, ".env is not git-ignored"
    example = subprocess.run([git, "check-ignore", "-q", ".env.example"], cwd=REPO, check=False)
    assert example.returncode == 1, ".env.example is git-ignored"
    assert ".env" in (REPO / ".dockerignore").read_text().split()


def test_defines_rabbitmq_etcd_and_graphite(compose: dict[str, Any]) -> None:
    assert DEPENDENCIES <= set(compose["services"])


@pytest.mark.parametrize("service", sorted(EXPECTED_PORTS))
def test_publishes_the_ports_clients_use(compose: dict[str, Any], service: str) -> None:
    published = {
        (host, target, protocol)
        for _, host, target, protocol in published_ports(compose["services"][service])
    }
    missing = EXPECTED_PORTS[service] - published
    assert not missing, f"{service} does not publish {sorted(missing)}; it publishes {published}"


def test_ports_are_published_on_loopback_only(resolved: dict[str, Any]) -> None:
    # No auth on etcd, root/root on Graphite's admin, the management UI: not for the LAN.
    exposed = [
        (name, port)
        for name, service in resolved["services"].items()
        for port in published_ports(service)
        if port[0] != LOOPBACK
    ]
    assert not exposed, f"ports published beyond {LOOPBACK}: {exposed}"


def test_rabbitmq_image_has_the_management_ui(compose: dict[str, Any]) -> None:
    assert "management" in compose["services"]["rabbitmq"]["image"]


def test_etcd_is_3_5_listening_on_all_interfaces_and_advertising_localhost(
    compose: dict[str, Any],
) -> None:
    etcd = compose["services"]["etcd"]
    assert re.search(r"etcd:v3\.5\.\d+$", etcd["image"]), etcd["image"]
    command = etcd["command"]
    command = command.split() if isinstance(command, str) else command
    assert "--listen-client-urls=http://0.0.0.0:2379" in command
    assert "--advertise-client-urls=http://localhost:2379" in command


def test_mounted_files_exist_in_the_repository(compose: dict[str, Any]) -> None:
    mounts = {
        (name, target, source)
        for name, service in compose["services"].items()
        for target, source in bind_mounts(service).items()
    }
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
    compose: dict[str, Any], metric: str
) -> None:
    schemas = configparser.ConfigParser(interpolation=None)
    schemas.read_string(mounted_file(compose, STORAGE_SCHEMAS_TARGET).read_text())
    assert finest_precision_seconds(schemas, metric) == 1
