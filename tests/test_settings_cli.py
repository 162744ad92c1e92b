"""Settings as a user meets them on the command line: ``SERVICE_NAME=orders python -m svc``.

A bad setting must stop the daemon before it connects anywhere, with exit status 2 and one
line on stderr that names the variable, shows the value given and says what is expected. The
exit-2 cases point RABBIT_URL at a closed port, so they never need (or touch) the broker.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import (
    Publisher,
    ServiceProcess,
    StatsdListener,
    amqp_url,
    base_environment,
    rabbitmqctl,
    run_svc_once,
    unique_name,
    vhost_of,
    wait_queue_empty,
)

# Nothing listens on port 1: a daemon that wrongly got past validation cannot reach a broker.
UNREACHABLE_RABBIT = "amqp://guest:guest@127.0.0.1:1/%2F"
GOOD = {"SERVICE_NAME": "orders", "RABBIT_URL": UNREACHABLE_RABBIT, "STATSD_PORT": "1"}

# (variable, value given, a pattern any sensible "what is expected" wording matches)
BAD_SETTINGS = [
    ("SERVICE_NAME", "Orders", r"lower"),
    ("SERVICE_NAME", "orders/eu", r"lower|letters|digits"),
    ("SERVICE_NAME", "o" * 65, r"64"),
    ("ENABLE_ETCD", "maybe", r"true"),
    ("PREFETCH", "0", r"positive|integer"),
    ("HANDLER_MODULES", "no_such_module_here", r"import"),
    ("PREFETCH", "-3", r"positive|integer"),
    ("PREFETCH", "abc", r"positive|integer"),
    ("LOG_LEVEL", "LOUD", r"DEBUG|level"),
    ("RABBIT_URL", "http://x", r"amqp"),
    ("ETCD_ENDPOINTS", "localhost", r"host:port|port"),
    ("ETCD_ENDPOINTS", "host:99999", r"port|65535"),
    ("STATSD_PORT", "abc", r"port|integer|number"),
    ("LOG_EVENTS", "perhaps", r"true"),
    ("DEDUP_CLAIM_TTL", "0", r"second"),
    ("ETCD_TIMEOUT", "-1", r"second"),
]


def assert_one_line_error(done: object, *fragments: str) -> str:
    """Exit 2 and exactly one stderr line holding every fragment; return that line."""
    code, stdout, stderr = done.returncode, done.stdout, done.stderr  # type: ignore[attr-defined]
    assert code == 2, f"exit status {code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr + stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    BAD_SETTINGS,
    ids=[f"{v}={x[:12]}" for v, x, _ in BAD_SETTINGS],
)
def test_bad_setting_exits_2_naming_variable_value_and_expected_form(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    done = run_svc_once({**GOOD, variable: value}, cwd=tmp_path)

    line = assert_one_line_error(done, variable, repr(value))
    assert re.search(expected, line, re.IGNORECASE), f"no hint of the expected form in {line!r}"


def test_missing_service_name_exits_2_naming_it(tmp_path: Path) -> None:
    settings = {k: v for k, v in GOOD.items() if k != "SERVICE_NAME"}

    done = run_svc_once(settings, cwd=tmp_path)

    line = assert_one_line_error(done, "SERVICE_NAME")
    assert re.search(r"required|missing|not set", line, re.IGNORECASE), line


def test_dotenv_in_working_dir_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PREFETCH=0\n")

    done = run_svc_once(GOOD, cwd=tmp_path)

    line = assert_one_line_error(done, "PREFETCH", "'0'")
    assert "PREFETCH='0' (from .env) is invalid" in line, line


def test_a_handler_module_from_dotenv_that_does_not_import_says_so(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("HANDLER_MODULES=no_such_module_here\n")

    done = run_svc_once(GOOD, cwd=tmp_path)

    line = assert_one_line_error(done, "HANDLER_MODULES", "'no_such_module_here'")
    assert "(from .env) is invalid" in line, line


def test_real_environment_wins_over_dotenv_when_validating(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PREFETCH=0\nLOG_LEVEL=LOUD\n")

    done = run_svc_once({**GOOD, "PREFETCH": "abc", "LOG_LEVEL": "debug"}, cwd=tmp_path)

    line = assert_one_line_error(done, "PREFETCH", "'abc'")
    assert "'0'" not in line


@pytest.mark.rabbit
def test_service_runs_on_settings_from_dotenv_alone(
    run_service: Callable[..., ServiceProcess],
    vhost: str,
    statsd_listener: StatsdListener,
    tmp_path: Path,
) -> None:
    name = unique_name("orders")
    (tmp_path / ".env").write_text(
        f"SERVICE_NAME={name}\nRABBIT_URL={vhost}\nSTATSD_HOST=127.0.0.1\n"
        f"STATSD_PORT={statsd_listener.port}\n"
    )

    svc = run_service(
        None, cwd=tmp_path, wait_ready=False, RABBIT_URL=None, STATSD_PORT=None, STATSD_HOST=None
    )

    svc.wait_ready(name=name)
    statsd_listener.wait_seen(f"{name}_new_order_ok")


@pytest.mark.rabbit
def test_real_environment_wins_over_dotenv(
    run_service: Callable[..., ServiceProcess], vhost: str, tmp_path: Path
) -> None:
    from_file, from_env = unique_name("dotenv"), unique_name("environ")
    (tmp_path / ".env").write_text(f"SERVICE_NAME={from_file}\nPREFETCH=0\n")

    svc = run_service(from_env, cwd=tmp_path, PREFETCH="7")

    assert svc.count(from_file) == 0, svc.text()
    assert svc.matches(r"prefetch\W{0,3}7\b"), f"prefetch 7 not in the settings:\n{svc.text()}"


@pytest.mark.rabbit
def test_an_empty_setting_takes_its_default_with_a_warning_naming_it(
    run_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """PREFETCH= (as a blank .env line or compose variable gives) is not an error, but it is
    not silent either: the service says which default it took."""
    (tmp_path / ".env").write_text("PREFETCH=\nLOG_EVENTS=\n")

    svc = run_service(unique_name("orders"), cwd=tmp_path)

    warnings = [line for line in svc.snapshot() if " WARNING " in line]
    assert any("PREFETCH is set but empty: its default '500' applies" in w for w in warnings)
    assert any("LOG_EVENTS is set but empty: its default 'true' applies" in w for w in warnings)
    assert svc.matches(r"prefetch=500\b"), svc.text()


@pytest.mark.rabbit
def test_rabbit_password_never_logged_while_settings_are(
    request: pytest.FixtureRequest,
    run_service: Callable[..., ServiceProcess],
    vhost: str,
    publisher: Publisher,
) -> None:
    user, password = f"user-{uuid.uuid4().hex[:8]}", f"pw{uuid.uuid4().hex}"
    rabbitmqctl("add_user", user, password)
    request.addfinalizer(lambda: rabbitmqctl("delete_user", user))
    rabbitmqctl("set_permissions", "-p", vhost_of(vhost), user, ".*", ".*", ".*")
    name = unique_name("orders")

    svc = run_service(name, RABBIT_URL=amqp_url(vhost_of(vhost), user, password))
    publisher.publish({"type": "new_order", "id": "pw-1"})
    svc.wait_for_line("new_order id=pw-1 ok")
    assert svc.terminate() == 0

    assert password not in svc.text()
    settings_lines = [line for line in svc.snapshot() if user in line]
    assert len(settings_lines) == 1, f"expected one start-up settings line:\n{svc.text()}"
    assert "127.0.0.1:5672" in settings_lines[0] and name in settings_lines[0]


@pytest.mark.rabbit
def test_unresolvable_statsd_host_warns_and_keeps_consuming(
    run_service: Callable[..., ServiceProcess], vhost: str, publisher: Publisher
) -> None:
    name = unique_name("orders")

    svc = run_service(name, STATSD_HOST="no-such-host.invalid")
    publisher.publish({"type": "new_order", "id": "nostatsd-1"})

    svc.wait_for_line("new_order id=nostatsd-1 ok")
    warnings = [line for line in svc.snapshot() if " WARNING " in line]
    assert any("no-such-host.invalid" in line for line in warnings), svc.text()
    wait_queue_empty(vhost, f"{name}-queue", timeout=30)
    assert svc.is_running()


@pytest.mark.rabbit
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_settings_and_declares_nothing(
    tmp_path: Path, vhost: str, flag: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "svc", flag],
        env={**base_environment(), "SERVICE_NAME": "orders", "RABBIT_URL": vhost},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    for name in ("SERVICE_NAME", "ENABLE_ETCD", "RABBIT_URL", "PREFETCH", "ETCD_PASSWORD_FILE"):
        assert name in done.stdout, f"{name} missing from --help"
    assert "TEST_CRASH_AT" not in done.stdout
    listed = rabbitmqctl("list_queues", "-p", vhost_of(vhost), "--quiet", "name")
    assert "orders-queue" not in listed, "--help started the daemon and declared its queue"


def test_an_argument_is_refused_with_a_pointer_to_help(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "svc", "--prefetch=5"],
        env={**base_environment(), **GOOD},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    assert "'--prefetch=5'" in done.stderr and "--help" in done.stderr
