"""`ember chat`, driven through its stdin like a person at a terminal."""
from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.server_util import ServerProcess, module_server

ROOT = Path(__file__).resolve().parents[1]


server = module_server("chat")


class Terminal:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "chat", *args], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.out: queue.Queue[str] = queue.Queue()
        self.seen = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for ch in iter(lambda: self.proc.stdout.read(1), ""):  # type: ignore[union-attr]
            self.out.put(ch)

    def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while time.monotonic() < deadline:
            m = re.search(pattern, self.seen[start:])
            if m:
                self.seen = self.seen[: start + m.end()] + self.seen[start + m.end():]
                return m
            try:
                self.seen += self.out.get(timeout=0.2)
            except queue.Empty:
                pass
        raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.seen[-2000:]}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def test_chat_fork_list_resume(server: ServerProcess) -> None:
    t = Terminal("--url", server.url, "--max-tokens", "8")
    first = t.expect(r"session: (sess_\w+) \(").group(1)
    t.send("Hello! Who are you?")
    t.expect(r"\[(completed|incomplete): \d+ tokens")
    t.send("/fork")
    fork = t.expect(r"forked: now in (sess_\w+)\n").group(1)
    t.send("Say hi.")
    cached = int(t.expect(r"\[(?:completed|incomplete): \d+ tokens, (\d+)/\d+ prompt tokens cached\]").group(1))
    assert cached > 0  # the fork starts from its parent's cached prefix
    t.send("/list")
    block = t.expect(r"((?:[* ] sess_\w+ state=\w+ last_seq=\d+\n)+)you> ").group(1)
    assert f"* {fork} state=idle" in block and f"  {first} state=idle" in block, block
    t.send(f"/resume {first}")
    t.expect(rf"session: {first} \(state idle")
    t.send("/quit")
    assert t.proc.wait(timeout=30) == 0


def test_chat_starts_its_own_server_when_given_none() -> None:
    t = Terminal("--max-tokens", "4")
    t.expect(r"session: sess_\w+ \(", timeout=300)
    t.send("Hi")
    t.expect(r"\[(completed|incomplete): \d+ tokens")
    t.send("/quit")
    assert t.proc.wait(timeout=30) == 0
