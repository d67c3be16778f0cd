"""Hostile and slow clients: thousands of malformed frames, and a client that stops reading.
Neither harms the server, other sessions, or the engine."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_util import Client, ServerProcess, module_server

TYPES = ["session.update", "conversation.item.create", "response.create", "response.cancel",
         "session.fork", "session.close", "error", "", "response.done", "session.created"]
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
event = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES)},
    optional={"event_id": json_value, "item": json_value | st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "function_call_output", "x"]), "role": json_value, "content": json_value,
         "call_id": json_value, "output": json_value}),
        "response": json_value | st.fixed_dictionaries({"max_output_tokens": st.integers(-5, 3)}),
        "session": json_value, "metadata": json_value, "response_id": json_value},
)
frame = st.one_of(
    event.map(lambda e: json.dumps(e)),
    st.text(max_size=200),
    st.binary(max_size=200),
    json_value.map(lambda v: json.dumps(v)),
)


server = module_server("robust", "--max-model-len", "512", "--send-queue-events", "8", "--max-item-tokens", "200000")


class Fuzzer:
    """One connection, read by a background thread so the server never sees a slow reader."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.sent = 0
        self.connect()

    def connect(self) -> None:
        self.client = Client(self.server)
        self.alive = True
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        try:
            while True:
                self.client.ws.recv()
        except Exception:
            self.alive = False

    def send(self, data: str | bytes) -> None:
        if not self.alive:
            self.connect()  # a fuzzed session.close ends the session: carry on with a new one
        try:
            self.client.ws.send(data)
            self.sent += 1
        except Exception:
            self.alive = False


@pytest.fixture(scope="module")
def fuzzer(server: ServerProcess) -> Fuzzer:
    return Fuzzer(server)


@settings(max_examples=45, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(frames=st.lists(frame, min_size=50, max_size=50))
def test_fuzzed_frames(fuzzer: Fuzzer, frames: list[str | bytes]) -> None:
    for f in frames:
        fuzzer.send(f)


def test_after_the_fuzz_a_normal_session_works(server: ServerProcess, fuzzer: Fuzzer) -> None:
    assert fuzzer.sent >= 2000
    assert server.proc is not None and server.proc.poll() is None
    c = Client(server)
    assert c.recv()["type"] == "session.created"
    done = c.turn("What is the capital of France?", max_output_tokens=8, temperature=0)
    assert "Paris" in done["response"]["output"][0]["content"][0]["text"]
    c.close()


class RawReader:
    """A WebSocket client that completes the handshake and then reads only when told to: the
    slow reader (a library client keeps reading on its own thread). Tiny receive buffer."""

    def __init__(self, server: ServerProcess, path: str) -> None:
        import base64
        import os
        import socket

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {server.url}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0]

    def read_until_close(self, timeout: float = 60) -> int | None:
        """Read every frame; the close code of the close frame, or None on EOF without one."""
        self.sock.settimeout(timeout)
        while True:
            while len(self.buf) >= 2:
                opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
                off = 2
                if n == 126:
                    n, off = int.from_bytes(self.buf[2:4], "big"), 4
                elif n == 127:
                    n, off = int.from_bytes(self.buf[2:10], "big"), 10
                if len(self.buf) < off + n:
                    break
                payload, self.buf = self.buf[off : off + n], self.buf[off + n :]
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big")
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.buf += data


def test_a_slow_reader_is_disconnected_and_stalls_nobody(server: ServerProcess) -> None:
    driver = Client(server)
    sid = driver.recv()["session"]["id"]
    watcher = RawReader(server, f"/v1/ws?session_id={sid}")  # a console that stopped reading
    big = "lorem ipsum " * 16000  # each echo (conversation.item.added) is ~190 KB
    t0 = time.monotonic()
    for _ in range(40):  # ~7.6 MB of events: more than the socket buffers hold
        driver.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": big}})
        driver.until("conversation.item.added")
    # The driver was served throughout, and so is a new session.
    other = Client(server)
    other.recv()
    other.turn("Say hi.", max_output_tokens=4, temperature=0)
    other.close()
    assert time.monotonic() - t0 < 120
    # The watcher, reading at last, finds the documented close code after what was queued.
    assert watcher.read_until_close() == 4408
    # It resumes and misses nothing (seq 1: session.created, 2: the watcher's session.resumed).
    back = Client(server, f"?session_id={sid}&after_seq=2")
    replay = back.until("session.resumed")
    assert [e["type"] for e in replay] == ["conversation.item.added"] * 40 + ["session.resumed"]
    assert [e["seq"] for e in replay] == list(range(3, 44))
    back.close()
    driver.close()
