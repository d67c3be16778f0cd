"""Real redis-server instances on free loopback ports, started and stopped by the tests."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A port p with p + 10000 free too (a cluster node's bus port)."""
    import random

    for _ in range(200):
        p = random.randrange(20000, 45000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs Debian's redis-server")
    return path


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def start_cluster(workdir: Path, nodes: int = 3) -> list[RedisServer]:
    servers = []
    for i in range(nodes):
        servers.append(RedisServer(workdir / f"node{i}", free_cluster_port(), "--cluster-enabled", "yes",
                                   "--cluster-config-file", f"nodes-{i}.conf", "--cluster-node-timeout", "2000").start())
    subprocess.run(
        [_binary("redis-cli"), "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in servers],
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = servers[0].client().cluster("info")
        if info.get("cluster_state") == "ok":
            return servers
        time.sleep(0.1)
    raise RuntimeError("the Redis cluster did not become ready")
