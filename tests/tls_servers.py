"""Certificates made by the tests, and servers that demand them: a RabbitMQ node with a TLS
listener (mutual TLS) and etcd over TLS or with authentication, all on loopback.

The RabbitMQ node is a second node of its own (own name, ports, config, data and cookie in a
temporary directory); the machine's default node is never touched.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pyetcd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import EtcdServer, Publisher, etcd_binary, free_port, wait_until

LOOPBACK_NAMES = ("localhost", "127.0.0.1")
UNNAMED_LOOPBACK = "127.0.0.2"


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert_file: Path
    key_file: Path

    def key_pem_body(self) -> str:
        """The base64 body of the private key, the part that must never be logged."""
        lines = self.key_file.read_text().splitlines()
        return "".join(line for line in lines if not line.startswith("-----"))


class CertificateAuthority:
    """A throw-away CA that issues server and client certificates into ``directory``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {name}")])
        self._subject = subject
        self.cert = (
            _builder(subject, subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = directory / f"{name}-ca.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str, hosts: tuple[str, ...] = LOOPBACK_NAMES) -> KeyPair:
        """A certificate for ``common_name``, valid for TLS servers and clients on ``hosts``."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                import ipaddress

                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _builder(subject, self._subject, key.public_key()).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = self.directory / f"{self.name}-{common_name}"
        pair = KeyPair(Path(f"{stem}.pem"), Path(f"{stem}-key.pem"))
        pair.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return pair


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


# --- a RabbitMQ node with a TLS listener ------------------------------------------------------


def rabbitmq_script(name: str) -> str:
    """The RabbitMQ script itself, not Debian's wrapper that switches to the rabbitmq user."""
    direct = Path("/usr/lib/rabbitmq/bin") / name
    if direct.exists():
        return str(direct)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed")
    return found


class RabbitTlsNode:
    """A RabbitMQ node of its own, listening only for AMQP over TLS on a free loopback port.

    The listener demands a client certificate signed by ``ca`` (``verify_peer`` and
    ``fail_if_no_peer_cert``). The node has one user, ``user`` / ``password``, with all rights
    on vhost ``/``; the management plugin is off. Its HOME is its own directory, so it has
    its own Erlang cookie and ``rabbitmqctl`` reaches only it.
    """

    def __init__(self, base_dir: Path, ca: CertificateAuthority, server: KeyPair) -> None:
        self.base_dir = base_dir
        self.node = f"tls-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.user = "svc-user"
        self.password = f"amqp-pw-{uuid.uuid4().hex}"
        self.ca = ca
        self.server = server
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in_seconds = 0.0

    def _environment(self) -> dict[str, str]:
        plugins = self.base_dir / "enabled_plugins"
        plugins.write_text("[].\n")
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.base_dir),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.base_dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base_dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(self.base_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base_dir / "log"),
            "RABBITMQ_PID_FILE": str(self.base_dir / "rabbit.pid"),
            # Erlang distribution on loopback only, as the AMQP listener.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _write_config(self) -> None:
        (self.base_dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "listeners.tcp = none",
                    f"listeners.ssl.1 = 127.0.0.1:{self.port}",
                    # A loopback address the server certificate does not name.
                    f"listeners.ssl.2 = {UNNAMED_LOOPBACK}:{self.port}",
                    f"ssl_options.cacertfile = {self.ca.cert_file}",
                    f"ssl_options.certfile = {self.server.cert_file}",
                    f"ssl_options.keyfile = {self.server.key_file}",
                    "ssl_options.verify = verify_peer",
                    "ssl_options.fail_if_no_peer_cert = true",
                    f"default_user = {self.user}",
                    f"default_pass = {self.password}",
                    "loopback_users = none",
                    "",
                ]
            )
        )
        (self.base_dir / "advanced.config").write_text("[].\n")

    def url(self, vhost: str = "%2F", password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"amqps://{self.user}:{secret}@localhost:{self.port}/{vhost}"

    def start(self, timeout: float = 120.0) -> None:
        """Start the node and wait until its TLS listener accepts connections."""
        self._write_config()
        started = time.monotonic()
        log = open(self.base_dir / "server.out", "ab")  # noqa: SIM115 - closed by the child's exit
        try:
            self.process = subprocess.Popen(
                [rabbitmq_script("rabbitmq-server")],
                env=self._environment(),
                cwd=self.base_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        # The listener opens once the node has booted; rabbitmqctl cannot wait for a node that
        # has not yet registered with epmd.
        wait_until(self._listens, timeout, f"the TLS listener on port {self.port}", interval=0.2)
        self.started_in_seconds = time.monotonic() - started

    def _listens(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"RabbitMQ node exited; output:\n{self.output()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run rabbitmqctl against this node only."""
        done = subprocess.run(
            [rabbitmq_script("rabbitmqctl"), "-n", self.node, *args],
            env=self._environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl -n {self.node} {' '.join(args)} failed: {done.stdout}{done.stderr}"
                f"\nnode output:\n{self.output()}"
            )
        return done.stdout

    def add_vhost(self, name: str) -> str:
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, self.user, ".*", ".*", ".*")
        return name

    def output(self) -> str:
        try:
            return (self.base_dir / "server.out").read_text(errors="replace")[-4000:]
        except OSError:
            return "(no output)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.ctl("stop", timeout=60)
            self.process.wait(timeout=60)
        except (AssertionError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=30)

    def client_context(self, client: KeyPair | None, ca_file: Path | None = None) -> ssl.SSLContext:
        """A client SSL context for tests' own connections (publishers, probes)."""
        context = ssl.create_default_context(cafile=str(ca_file or self.ca.cert_file))
        if client is not None:
            context.load_cert_chain(str(client.cert_file), str(client.key_file))
        return context


# --- etcd over TLS, and etcd with authentication ---------------------------------------------


class SecureEtcdServer(EtcdServer):
    """etcd on https loopback URLs that demands a client certificate signed by ``ca``."""

    scheme = "https"

    def __init__(self, base_dir: Path, ca: CertificateAuthority, server: KeyPair, client: KeyPair):
        super().__init__(base_dir)
        self.ca, self.server, self.client_pair = ca, server, client

    def _extra_flags(self) -> list[str]:
        return [
            f"--cert-file={self.server.cert_file}",
            f"--key-file={self.server.key_file}",
            f"--trusted-ca-file={self.ca.cert_file}",
            "--client-cert-auth",
        ]

    def _connect(self, timeout: float) -> Any:
        return pyetcd.client(
            host="127.0.0.1",
            port=self.client_port,
            timeout=timeout,
            ca_cert=str(self.ca.cert_file),
            cert_cert=str(self.client_pair.cert_file),
            cert_key=str(self.client_pair.key_file),
        )


class AuthEtcdServer(EtcdServer):
    """Plain-text etcd with authentication on: user ``root`` and one service user.

    The service user may read and write every key under ``/service/``.
    """

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.root_password = f"root-pw-{uuid.uuid4().hex}"
        self.user = "svc-user"
        self.password = f"etcd-pw-{uuid.uuid4().hex}"
        self.auth_enabled = False

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        self.etcdctl("user", "add", f"root:{self.root_password}")
        self.etcdctl("role", "add", "svc")
        self.etcdctl("role", "grant-permission", "svc", "--prefix=true", "readwrite", "/service/")
        self.etcdctl("user", "add", f"{self.user}:{self.password}")
        self.etcdctl("user", "grant-role", self.user, "svc")
        self.etcdctl("auth", "enable")

    def etcdctl(self, *args: str, stdin: str | None = None) -> str:
        """Run etcdctl against this server, as root once authentication is on."""
        etcdctl = Path(etcd_binary()).with_name("etcdctl")
        command = [str(etcdctl), "--endpoints", f"http://{self.endpoint}"]
        if self.auth_enabled:
            command += ["--user", f"root:{self.root_password}"]
        done = subprocess.run(
            [*command, *args], input=stdin, check=False, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args[:2])} failed: {done.stdout}{done.stderr}")
        if args[:2] == ("auth", "enable"):
            self.auth_enabled = True
        return done.stdout

    def set_password_again(self) -> None:
        """Set the service user's password (to the same value): etcd voids the user's tokens."""
        self.etcdctl("user", "passwd", self.user, "--interactive=false", stdin=self.password + "\n")

    def client(self, timeout: float = 30.0) -> Any:
        etcd = pyetcd.client(
            host="127.0.0.1",
            port=self.client_port,
            timeout=timeout,
            user="root",
            password=self.root_password,
        )
        # pyetcd also attaches its token as call credentials, which gRPC refuses on a channel
        # without TLS; the request metadata it sets alongside carries the token on its own.
        etcd.call_credentials = None
        self._clients.append(etcd)
        return etcd


class TlsMaterial:
    """Everything the TLS tests need, written once into ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority(directory, "good")
        self.server = self.ca.issue("server")
        self.client = self.ca.issue("svc-client", hosts=())
        #: a CA nobody trusts, with a server certificate of its own
        self.other_ca = CertificateAuthority(directory, "other")
        self.other_client = self.other_ca.issue("intruder", hosts=())


class TlsPublisher(Publisher):
    """A confirming publisher that connects over mutual TLS to a :class:`RabbitTlsNode`."""

    def __init__(self, node: RabbitTlsNode, vhost: str, client: KeyPair) -> None:
        self.url = node.url(vhost)
        params = pika.URLParameters(self.url)
        params.ssl_options = pika.SSLOptions(node.client_context(client), "localhost")
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
