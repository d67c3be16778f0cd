"""A real `ember serve` process on a free loopback port, and a small synchronous client."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.redis_util import free_port


class ServerProcess:
    def __init__(self, *args: str, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> ServerProcess:
        import httpx

        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", "--port", str(self.port), *self.args],
            stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("ember serve did not come up")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


class Client:
    """A synchronous websockets client speaking the session protocol."""

    def __init__(self, server: ServerProcess, query: str = "", headers: dict[str, str] | None = None) -> None:
        from websockets.sync.client import connect

        self._cm = connect(f"ws://{server.url}/v1/ws{query}", additional_headers=headers or {}, open_timeout=30)
        self.ws = self._cm.__enter__()
        self.events: list[dict[str, Any]] = []

    def send(self, event: dict[str, Any]) -> None:
        self.ws.send(json.dumps(event))

    def recv(self, timeout: float = 120) -> dict[str, Any]:
        from tools.protocol import decode_server_event

        raw = self.ws.recv(timeout=timeout)
        decode_server_event(raw)  # every event the server sends conforms to the typed contract
        ev = json.loads(raw)
        self.events.append(ev)
        return ev

    def until(self, type_: str, timeout: float = 120) -> list[dict[str, Any]]:
        got = []
        while True:
            ev = self.recv(timeout)
            got.append(ev)
            if ev["type"] == type_:
                return got

    def turn(self, text: str, **response: Any) -> dict[str, Any]:
        """A user message and a response; returns the response.done event."""
        self.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": text}})
        self.until("conversation.item.added")
        self.send({"type": "response.create", "response": response})
        return self.until("response.done")[-1]

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def module_server(name: str, *args: str):  # type: ignore[no-untyped-def]
    """A module-scoped fixture: one `ember serve` (with `args`) for the tests of a module."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
        srv = ServerProcess(*args, log_path=tmp_path_factory.mktemp(name) / "server.log").start()
        yield srv
        srv.stop()

    return server
