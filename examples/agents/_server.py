"""For the examples: use the server at --url, or start `ember serve` on the embedded model for the
duration of the run."""
from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]


def _healthy(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"{http}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def server(url: str | None, *serve_args: str) -> Iterator[str]:
    """Yields the server's host:port."""
    if url:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--port", str(port), *serve_args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not _healthy(f"http://127.0.0.1:{port}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("ember serve did not start")
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", help="host:port of a running `ember serve` (default: start one)")
    return ap.parse_args()
