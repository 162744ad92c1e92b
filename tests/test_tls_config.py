"""TLS and credential settings: checked at start-up, named in every error, never echoed."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from svc.config import Settings, load_settings
from svc.errors import ConfigError
from tests.support import run_svc_once
from tests.tls_servers import CertificateAuthority, KeyPair

SECRET = "s3cret-Pa55/word"
ENCODED = quote(SECRET, safe="")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, KeyPair]:
    ca = CertificateAuthority(tmp_path_factory.mktemp("certs"), "unit")
    return ca, ca.issue("client", hosts=())


def load(tmp_path: Path, **env: str) -> Settings:
    return load_settings({"SERVICE_NAME": "orders", **env}, dotenv_path=tmp_path / "none.env")


def config_error(tmp_path: Path, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, **env)
    return str(caught.value)


def test_password_file_replaces_the_url_password_minus_its_final_newline(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET + "\n")
    settings = load(
        tmp_path,
        RABBIT_URL="amqp://orders@rabbit:5672/%2F,amqp://orders:old@rabbit2:5672/%2F",
        RABBIT_PASSWORD_FILE=str(secret_file),
    )
    assert settings.rabbit_urls == (
        "amqp://orders:s3cret-Pa55%2Fword@rabbit:5672/%2F",
        "amqp://orders:s3cret-Pa55%2Fword@rabbit2:5672/%2F",
    )


def test_etcd_password_from_file_or_variable(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET)
    from_file = load(tmp_path, ETCD_USER="svc", ETCD_PASSWORD_FILE=str(secret_file))
    from_env = load(tmp_path, ETCD_USER="svc", ETCD_PASSWORD=SECRET)
    assert from_file.etcd_password == from_env.etcd_password == SECRET
    assert from_file.etcd_user == "svc"


def test_both_a_secret_and_its_file_is_an_error(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET)
    message = config_error(
        tmp_path, ETCD_USER="svc", ETCD_PASSWORD=SECRET, ETCD_PASSWORD_FILE=str(secret_file)
    )
    assert "ETCD_PASSWORD and ETCD_PASSWORD_FILE are both set" in message
    assert SECRET not in message


def test_missing_secret_file_names_the_variable_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    message = config_error(tmp_path, RABBIT_PASSWORD_FILE=str(missing))
    assert message == (
        f"RABBIT_PASSWORD_FILE='{missing}' is invalid: expected a readable file "
        "(No such file or directory)"
    )


def test_user_without_password_and_password_without_user_are_errors(tmp_path: Path) -> None:
    assert "ETCD_USER is set but ETCD_PASSWORD is not" in config_error(tmp_path, ETCD_USER="svc")
    message = config_error(tmp_path, ETCD_PASSWORD=SECRET)
    assert "ETCD_PASSWORD is set but ETCD_USER is not" in message
    assert SECRET not in message


def test_rabbit_password_needs_a_user_in_every_url(tmp_path: Path) -> None:
    message = config_error(tmp_path, RABBIT_URL="amqps://rabbit:5671/%2F", RABBIT_PASSWORD=SECRET)
    assert "expected a user name in every URL" in message
    assert SECRET not in message


def test_client_certificate_without_key_is_an_error(
    tmp_path: Path, certs: tuple[CertificateAuthority, KeyPair]
) -> None:
    _, client = certs
    message = config_error(
        tmp_path, RABBIT_URL="amqps://u:p@rabbit/%2F", RABBIT_CERT_FILE=str(client.cert_file)
    )
    assert message == (
        "RABBIT_CERT_FILE is set but RABBIT_KEY_FILE is not: a client certificate needs both"
    )
    message = config_error(tmp_path, ETCD_KEY_FILE=str(client.key_file))
    assert (
        message == "ETCD_KEY_FILE is set but ETCD_CERT_FILE is not: a client certificate needs both"
    )


def test_unusable_tls_files_name_the_variable_and_the_path(
    tmp_path: Path, certs: tuple[CertificateAuthority, KeyPair]
) -> None:
    ca, client = certs
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    message = config_error(tmp_path, RABBIT_URL="amqps://u:p@h/%2F", RABBIT_CA_FILE=str(not_pem))
    assert message.startswith(f"RABBIT_CA_FILE='{not_pem}' is invalid: expected a readable PEM")

    missing = tmp_path / "missing.pem"
    message = config_error(tmp_path, ETCD_CA_FILE=str(missing))
    assert message.startswith(f"ETCD_CA_FILE='{missing}' is invalid: expected a readable PEM")

    other = ca.issue("other", hosts=())
    message = config_error(
        tmp_path, ETCD_CERT_FILE=str(client.cert_file), ETCD_KEY_FILE=str(other.key_file)
    )
    assert message.startswith(f"ETCD_CERT_FILE='{client.cert_file}' is invalid: expected a PEM")
    assert "matches the key" in message
    assert other.key_pem_body()[:40] not in message


def test_tls_files_with_a_plain_amqp_url_are_refused_with_the_password_hidden(
    tmp_path: Path, certs: tuple[CertificateAuthority, KeyPair]
) -> None:
    ca, _ = certs
    message = config_error(
        tmp_path,
        RABBIT_URL=f"amqps://u:{ENCODED}@a:5671/%2F,amqp://u:{ENCODED}@b:5672/%2F",
        RABBIT_CA_FILE=str(ca.cert_file),
    )
    assert message.startswith("RABBIT_URL='amqp://u:***@b:5672/%2F' is invalid: expected amqps://")
    assert ENCODED not in message


def test_https_etcd_endpoints_turn_tls_on_and_a_plain_one_beside_them_is_refused(
    tmp_path: Path, certs: tuple[CertificateAuthority, KeyPair]
) -> None:
    settings = load(tmp_path, ETCD_ENDPOINTS="https://e1:2379,e2:2379")
    assert settings.etcd_secure
    assert settings.etcd_endpoints == (("e1", 2379), ("e2", 2379))
    assert not load(tmp_path, ETCD_ENDPOINTS="http://e1:2379").etcd_secure
    ca, _ = certs
    message = config_error(
        tmp_path, ETCD_ENDPOINTS="http://e1:2379", ETCD_CA_FILE=str(ca.cert_file)
    )
    assert message.startswith("ETCD_ENDPOINTS names an http:// endpoint while TLS")


def test_a_malformed_url_is_reported_without_its_password(tmp_path: Path) -> None:
    message = config_error(tmp_path, RABBIT_URL=f"amqp://user:{SECRET}@host:99999/%2F")
    assert message.startswith("RABBIT_URL='amqp://user:***@host:99999/%2F' is invalid")
    assert SECRET not in message
    # An unencoded '/' in the password: the URL cannot be parsed, and is hidden all the same.
    message = config_error(tmp_path, RABBIT_URL=f"amqp://user:{SECRET}@host:5672/%2F")
    assert message.startswith("RABBIT_URL='amqp://user:***@host:5672/%2F' is invalid")
    assert "percent-encode" in message
    assert "Pa55" not in message


def test_settings_line_and_repr_hide_every_password(tmp_path: Path) -> None:
    encoded = ENCODED
    settings = load(
        tmp_path,
        RABBIT_URL=f"amqp://user:{encoded}@host:5672/%2F",
        ETCD_USER="svc",
        ETCD_PASSWORD=SECRET + "-etcd",
    )
    assert "rabbit_url=amqp://user:***@host:5672/%2F " in settings.describe()
    assert "etcd_user=svc etcd_password=***" in settings.describe()
    for text in (settings.describe(), repr(settings)):
        assert SECRET not in text
        assert encoded not in text


def test_the_daemon_exits_2_with_one_line_for_an_unreadable_password_file(tmp_path: Path) -> None:
    missing = tmp_path / "etcd-password"
    done = run_svc_once(
        {"SERVICE_NAME": "orders", "ETCD_USER": "svc", "ETCD_PASSWORD_FILE": str(missing)},
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"svc: ETCD_PASSWORD_FILE='{missing}' is invalid: expected a readable file "
        "(No such file or directory)\n"
    )
