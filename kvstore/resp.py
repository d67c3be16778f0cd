"""A small RESP2 client for moving KV blocks: pipelined GET/SET over several sockets, each value
read straight into the caller's buffer.

Why not redis-py for this path: it receives a large value as a list of chunks, joins them into
one `bytes`, and the tier then copies that into a tensor: three passes over every byte, all under
the GIL. Here the payload goes from the kernel into its final (pinned) buffer in one `recv_into`,
which releases the GIL, so several connections read in parallel threads.

Only what block I/O needs is spoken: AUTH/SELECT at connect, GET, SET [EX], and the replies
`+`, `-`, `:`, `$`. A connection that fails mid-reply is closed and reopened on its next use (the
reply stream can no longer be trusted); errors surface as `ConnectionError` / `OSError`, which the
tier treats as an outage.
"""
from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import parse_qs, unquote, urlparse

_READ_CHUNK = 1 << 16


class RespError(ConnectionError):
    """The server answered with an error reply (or something that is not RESP)."""


@dataclass(frozen=True)
class Endpoint:
    host: str | None = None
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """redis://[user:password@]host[:port][/db] or unix:///path[?db=N] (TLS and cluster
        URLs are not handled here: the tier uses redis-py for those)."""
        u = urlparse(url)
        user = unquote(u.username) if u.username else None
        pw = unquote(u.password) if u.password else None
        if u.scheme == "unix":
            db = int(parse_qs(u.query).get("db", ["0"])[0])
            return cls(unix_path=u.path, db=db, username=user, password=pw)
        if u.scheme != "redis":
            raise ValueError(f"the block client speaks redis:// and unix:// only, not {u.scheme}://")
        db = int(u.path.lstrip("/") or 0)
        return cls(host=u.hostname or "localhost", port=u.port or 6379, db=db, username=user, password=pw)


def command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class Connection:
    """One socket with a read buffer. Not thread-safe: a pool hands it to one thread at a time."""

    def __init__(self, ep: Endpoint, timeout_s: float) -> None:
        self.ep = ep
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buf = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def _open(self) -> socket.socket:
        if self.ep.unix_path is not None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout_s)
            s.connect(self.ep.unix_path)
        else:
            s = socket.create_connection((self.ep.host, self.ep.port), timeout=self.timeout_s)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self._sock, self._start, self._end = s, 0, 0
        hello = []
        if self.ep.password is not None:
            auth = (self.ep.username.encode(),) if self.ep.username else ()
            hello.append(command(b"AUTH", *auth, self.ep.password.encode()))
        if self.ep.db:
            hello.append(command(b"SELECT", str(self.ep.db).encode()))
        if hello:
            self.send([b"".join(hello)])
            for _ in hello:
                self.read_simple()
        return s

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def send(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write every part, in order, without joining them (payloads are not copied)."""
        s = self._sock or self._open()
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = s.sendmsg(views[:512])
            while sent and views:
                n = len(views[0])
                if sent >= n:
                    sent -= n
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    # ---- reading -------------------------------------------------------------------------
    def _fill(self) -> None:
        assert self._sock is not None
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            rest = self._end - self._start
            self._buf[:rest] = self._buf[self._start : self._end]
            self._start, self._end = 0, rest
        n = self._sock.recv_into(self._view[self._end :])
        if n == 0:
            raise ConnectionError("Redis closed the connection")
        self._end += n

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n", self._start, self._end)
            if i >= 0:
                line = bytes(self._buf[self._start : i])
                self._start = i + 2
                return line
            if self._end - self._start >= len(self._buf) - 2:
                raise RespError("reply line longer than the read buffer")
            self._fill()

    def _read_into(self, dst: memoryview) -> None:
        """Fill `dst` exactly: first from what is buffered, the rest straight from the socket."""
        assert self._sock is not None
        have = min(self._end - self._start, len(dst))
        dst[:have] = self._view[self._start : self._start + have]
        self._start += have
        got = have
        while got < len(dst):
            n = self._sock.recv_into(dst[got:])
            if n == 0:
                raise ConnectionError("Redis closed the connection")
            got += n

    def _skip(self, n: int) -> None:
        while n:
            if self._start == self._end:
                self._fill()
            k = min(n, self._end - self._start)
            self._start += k
            n -= k

    def read_simple(self) -> bytes | int:
        """A status, integer or error reply (errors raise RespError)."""
        line = self._line()
        kind, body = line[:1], line[1:]
        if kind == b"+":
            return body
        if kind == b":":
            return int(body)
        if kind == b"-":
            raise RespError(body.decode(errors="replace"))
        raise RespError(f"unexpected reply {line[:40]!r}")

    def read_bulk(self, sink: Callable[[int], tuple[memoryview, memoryview] | None]) -> int:
        """A bulk reply, with its length given to `sink`, which returns (head, body) buffers for the
        value's first and remaining bytes, or None to discard it. Returns the length (-1: nil)."""
        line = self._line()
        if line[:1] == b"-":
            raise RespError(line[1:].decode(errors="replace"))
        if line[:1] != b"$":
            raise RespError(f"unexpected reply {line[:40]!r}")
        n = int(line[1:])
        if n < 0:
            return n
        dst = sink(n)
        if dst is None:
            self._skip(n)
        else:
            head, body = dst
            assert len(head) + len(body) == n
            self._read_into(head)
            self._read_into(body)
        self._skip(2)  # the value's CRLF
        return n


class ConnectionPool:
    """`size` connections, each used by one thread at a time; `map` runs one job per connection in
    parallel (a job that fails closes its connection so the next use reconnects)."""

    def __init__(self, ep: Endpoint, size: int, timeout_s: float) -> None:
        self.conns = [Connection(ep, timeout_s) for _ in range(size)]
        self._lock = threading.Lock()  # one batch at a time over the whole pool
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="ember-resp") if size > 1 else None

    def _run(self, conn: Connection, job: Callable[[Connection], None]) -> None:
        reused = conn.is_open
        try:
            job(conn)
        except RespError:
            conn.close()  # the reply stream is no longer in step with our requests
            raise
        except OSError:
            conn.close()
            if not reused:
                raise
            # A kept-open socket may have outlived its server (a restart): the commands spoken
            # here (GET, SET) are idempotent, so the batch is sent once more on a new socket.
            try:
                job(conn)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise

    def map(self, jobs: Sequence[Callable[[Connection], None]]) -> None:
        assert len(jobs) <= len(self.conns)
        with self._lock:
            if self._executor is None or len(jobs) == 1:
                for conn, job in zip(self.conns, jobs):
                    self._run(conn, job)
                return
            futures = [self._executor.submit(self._run, c, j) for c, j in zip(self.conns, jobs)]
            errors = [f.exception() for f in futures]
            for e in errors:
                if e is not None:
                    raise e

    def close(self) -> None:
        for c in self.conns:
            c.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)


def split(n: int, parts: int) -> list[range]:
    """`range(n)` cut into at most `parts` contiguous, non-empty, near-equal pieces."""
    parts = max(1, min(parts, n))
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = q + (i < r)
        out.append(range(start, start + size))
        start += size
    return out
