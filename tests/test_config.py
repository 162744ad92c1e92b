"""Settings: defaults, .env precedence, and one clear error per bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from svc.config import load_settings, redact_url
from svc.errors import ConfigError


def settings_from(env: dict[str, str], tmp_path: Path, dotenv: str = ""):
    path = tmp_path / ".env"
    path.write_text(dotenv)
    return load_settings(env, dotenv_path=path)


def test_defaults_match_the_documented_table(tmp_path: Path) -> None:
    s = settings_from({"SERVICE_NAME": "orders"}, tmp_path)
    assert s.service_name == "orders"
    assert s.enable_etcd is False
    assert s.rabbit_urls == ("amqp://guest:guest@localhost:5672/%2F",)
    assert s.etcd_endpoints == (("localhost", 2379),)
    assert (s.statsd_host, s.statsd_port) == ("127.0.0.1", 8125)
    assert s.prefetch == 500
    assert s.log_events is True
    assert s.log_events_per_second == 100
    assert s.empty_with_default == ()


def test_empty_values_take_the_default_and_are_listed(tmp_path: Path) -> None:
    s = settings_from(
        {"SERVICE_NAME": "orders", "PREFETCH": "", "ETCD_ENDPOINTS": " ", "RABBIT_PASSWORD": ""},
        tmp_path,
    )
    assert s.prefetch == 500
    assert s.etcd_endpoints == (("localhost", 2379),)
    # RABBIT_PASSWORD's default is empty: an empty value is no surprise there.
    assert sorted(s.empty_with_default) == ["ETCD_ENDPOINTS", "PREFETCH"]
    assert s.log_level == "INFO"
    assert s.queue == "orders-queue"
    assert s.dead_letter_queue == "orders-dlq"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("Yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("NO", False),
        ("off", False),
    ],
)
def test_enable_etcd_accepts_every_documented_spelling(
    tmp_path: Path, raw: str, expected: bool
) -> None:
    s = settings_from({"SERVICE_NAME": "orders", "ENABLE_ETCD": raw}, tmp_path)
    assert s.enable_etcd is expected


@pytest.mark.parametrize(
    ("variable", "value", "expected_words"),
    [
        ("SERVICE_NAME", "Orders", "lowercase"),
        ("SERVICE_NAME", "a/b", "lowercase"),
        ("SERVICE_NAME", "x" * 65, "64"),
        ("ENABLE_ETCD", "maybe", "true/false"),
        ("PREFETCH", "0", "positive integer"),
        ("PREFETCH", "-3", "positive integer"),
        ("PREFETCH", "abc", "positive integer"),
        ("PREFETCH", "70000", "65535"),
        ("LOG_EVENTS_PER_SECOND", "-1", "0 (no cap) to 1000000"),
        ("LOG_EVENTS_PER_SECOND", "lots", "whole number of lines a second"),
        ("LOG_LEVEL", "LOUD", "logging level"),
        ("RABBIT_URL", "http://x", "AMQP URL"),
        ("RABBIT_URL", "amqp://h:99999/", "port"),
        ("ETCD_ENDPOINTS", "localhost", "host:port"),
        ("ETCD_ENDPOINTS", "localhost:99999", "port"),
        ("STATSD_PORT", "abc", "port"),
        ("ETCD_TIMEOUT", "0", "seconds"),
        ("DEDUP_CLAIM_TTL", "1.5", "whole number"),
    ],
)
def test_bad_value_names_variable_value_and_expected_form(
    tmp_path: Path, variable: str, value: str, expected_words: str
) -> None:
    env = {"SERVICE_NAME": "orders", variable: value}
    with pytest.raises(ConfigError) as caught:
        settings_from(env, tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{variable}=")
    assert repr(value)[:40] in message or repr(value)[:40].rstrip("'") in message
    assert expected_words in message
    assert "\n" not in message


def test_missing_service_name_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SERVICE_NAME is required but not set: expected 1 to"):
        settings_from({}, tmp_path)


def test_empty_service_name_says_empty_and_what_it_expects(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SERVICE_NAME is required but empty: expected 1 to"):
        settings_from({"SERVICE_NAME": " "}, tmp_path)


def test_a_bad_value_from_dotenv_says_it_came_from_there(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^PREFETCH='lots' \(from .*\.env\) is invalid"):
        settings_from({"SERVICE_NAME": "orders"}, tmp_path, dotenv="PREFETCH=lots\n")
    with pytest.raises(ConfigError, match=r"^PREFETCH='lots' is invalid"):
        settings_from({"SERVICE_NAME": "orders", "PREFETCH": "lots"}, tmp_path, dotenv="PREFETCH=9\n")


@pytest.mark.parametrize(
    ("dotenv", "expected"),
    [
        ("RABBIT_CA_FILE=/no/such/ca.pem\n", r"^RABBIT_CA_FILE='/no/such/ca.pem' is invalid: .*"),
        ("ETCD_USER=bob\n", r"^ETCD_USER is set but ETCD_PASSWORD is not: .*"),
    ],
)
def test_errors_about_several_settings_say_which_came_from_dotenv(
    tmp_path: Path, dotenv: str, expected: str
) -> None:
    name = dotenv.partition("=")[0]
    with pytest.raises(ConfigError, match=expected + rf"\({name} from .*\.env\)$"):
        settings_from({"SERVICE_NAME": "orders"}, tmp_path, dotenv=dotenv)


def test_a_name_inside_a_value_shown_is_not_blamed_on_dotenv(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from({"SERVICE_NAME": "PREFETCH=x"}, tmp_path, dotenv="PREFETCH=9\n")
    assert ".env" not in str(caught.value)


def test_a_required_setting_left_empty_in_dotenv_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^SERVICE_NAME is required but empty \(from .*\.env\)"):
        settings_from({}, tmp_path, dotenv="SERVICE_NAME=\n")


def test_an_unparsable_dotenv_line_is_reported_with_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings_from({"SERVICE_NAME": "orders"}, tmp_path, dotenv="PREFETCH=9\nnot a line\n")
    assert s.prefetch == 9
    assert f"starting at line 2 of {tmp_path / '.env'}" in caplog.text


def test_dotenv_fills_gaps_and_real_environment_wins(tmp_path: Path) -> None:
    s = settings_from(
        {"SERVICE_NAME": "orders", "PREFETCH": "7"},
        tmp_path,
        dotenv="SERVICE_NAME=notify\nPREFETCH=9\nENABLE_ETCD=yes\n",
    )
    assert s.service_name == "orders"
    assert s.prefetch == 7
    assert s.enable_etcd is True


def test_several_rabbit_urls_are_kept_in_order(tmp_path: Path) -> None:
    s = settings_from(
        {"SERVICE_NAME": "orders", "RABBIT_URL": "amqp://a:5672/%2F, amqp://b:5673/%2F"}, tmp_path
    )
    assert s.rabbit_urls == ("amqp://a:5672/%2F", "amqp://b:5673/%2F")


def test_description_redacts_passwords(tmp_path: Path) -> None:
    s = settings_from(
        {"SERVICE_NAME": "orders", "RABBIT_URL": "amqp://app:s3cret@broker:5672/prod"}, tmp_path
    )
    assert "s3cret" not in s.describe()
    assert "amqp://app:***@broker:5672/prod" in s.describe()
    assert redact_url("amqp://broker/") == "amqp://broker/"
