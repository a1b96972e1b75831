"""A pipelined Redis connection for the cache's commands, the lookup on a request's path first.

redis-py's command path (connection pool, checkout health check, per-command lock, stream
reader) runs a few hundred lines of Python per call. On a warm process that costs little, but a
dispatcher that has slept through a paced stream runs it from cold CPU caches: on this machine a
lookup after 20 ms idle took 555 us p50 through redis-py and 200 us through this client
(bench/RESULTS.md). So the cache's commands (lookups, scripts, writes) go over one connection
held here: they are written as they come (hiredis packs them), and replies are parsed by
hiredis's C reader and handed to the waiting calls in order. Pub/sub stays on redis-py.

A call whose caller stopped waiting keeps its place in the queue, so the late reply is dropped
and the next one still reaches its own caller. A connection that owes a reply for longer than
`reply_timeout` is presumed dead and closed, failing every call waiting on it (as redis-py's
socket timeout does); the next call connects again.

Takes `redis://` URLs: user, password, database, and the query options `client_name`,
`socket_connect_timeout` (else `connect_timeout`) and `socket_timeout` (else `reply_timeout`);
other options are ignored. `RedisStore` keeps redis-py for the other schemes (`rediss://`,
`unix://`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

Reply = Any  # bytes, int, None, or a list of them: what hiredis makes of a RESP2 reply


class _Pipeline(asyncio.Protocol):
    """One connection: replies go to the calls that wait for them, in the order they were sent."""

    def __init__(self, reply_timeout: float) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Reply], float]] = deque()
        self._reply_timeout = reply_timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def send(self, command: bytes) -> asyncio.Future[Reply]:
        if self.closed or self._transport is None:
            raise RedisConnectionError("redis connection closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._waiting.append((future, loop.time()))
        self._transport.write(command)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._reply_timeout, self._check_overdue)
        return future

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                future, _ = self._waiting.popleft()
                if not future.done():  # its caller may have stopped waiting
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as e:  # garbage, or a reply nobody asked for
            self.close(RedisConnectionError(f"redis connection out of step: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError(f"redis connection lost: {exc or 'closed by the server'}"))

    def _check_overdue(self) -> None:
        self._watchdog = None
        if not self._waiting or self.closed:
            return
        loop = asyncio.get_running_loop()
        due = self._waiting[0][1] + self._reply_timeout  # the oldest call's deadline
        if loop.time() >= due:
            self.close(RedisConnectionError("redis owes a reply past its timeout"))
        else:
            self._watchdog = loop.call_at(due, self._check_overdue)

    def close(self, error: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._transport is not None:
            self._transport.abort()
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


class PipelinedRedis:
    """Commands to one Redis over one connection, opened on the first call and after a loss."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        client_name: str | None = None,
        connect_timeout: float = 1.0,
        reply_timeout: float = 1.0,
    ) -> None:
        self._address = (host, port)
        self._db = db
        # Always AUTH <user> <password>: the one-argument form fails on a server without a
        # password (redis-py's HELLO ... AUTH does not), and a `nopass` user has an empty one.
        self._auth = (
            (username or "default", password or "") if username or password is not None else None
        )
        # Redis before 6 knows only AUTH <password>: the fallback for a URL without a user.
        self._password_only = password if not username and password else None
        self._client_name = client_name
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._pipe: _Pipeline | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def from_url(
        cls, url: str, *, connect_timeout: float = 1.0, reply_timeout: float = 1.0
    ) -> PipelinedRedis | None:
        """The client for `url`, or None for a URL it does not speak (TLS, a Unix socket)."""
        options: dict[str, Any] = dict(parse_url(url))
        if "connection_class" in options:
            return None
        return cls(
            host=options.get("host", "127.0.0.1"),
            port=int(options.get("port", 6379)),
            db=int(options.get("db", 0)),
            username=options.get("username"),
            password=options.get("password"),
            client_name=options.get("client_name"),
            connect_timeout=float(options.get("socket_connect_timeout") or connect_timeout),
            reply_timeout=float(options.get("socket_timeout") or reply_timeout),
        )

    async def call(self, *args: str | bytes | int) -> Reply:
        """One command's reply; an error reply raises redis-py's `ResponseError`."""
        pipe = self._pipe
        if pipe is None or pipe.closed:
            pipe = await self._connect()
        return _checked(await pipe.send(_pack(args)))

    async def run_script(
        self, digest: str, script: str, keys: Sequence[str], args: Sequence[str | bytes | int]
    ) -> Reply:
        """EVALSHA, falling back to EVAL (which loads the script) if Redis lost it."""
        try:
            return await self.call("EVALSHA", digest, len(keys), *keys, *args)
        except NoScriptError:
            return await self.call("EVAL", script, len(keys), *keys, *args)

    async def _connect(self) -> _Pipeline:
        async with self._connecting:  # one connect for every call that found none
            if self._pipe is not None and not self._pipe.closed:
                return self._pipe
            pipe = _Pipeline(self._reply_timeout)
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._open(pipe)
            except BaseException as e:
                pipe.close(RedisConnectionError("redis set-up failed"))
                if isinstance(e, Exception) and not isinstance(e, RedisError):
                    # A timeout, a refusal, a name that does not resolve: a RedisError, as the
                    # store fails open on those.
                    raise RedisConnectionError(f"redis connect failed: {e!r}") from e
                raise
            self._pipe = pipe
            return pipe

    async def _open(self, pipe: _Pipeline) -> None:
        await asyncio.get_running_loop().create_connection(lambda: pipe, *self._address)
        # Pipelined with each other; the first refusal fails the connect.
        setup: list[asyncio.Future[Reply]] = []
        if self._auth is not None and self._password_only is not None:
            await _auth_either_way(pipe, self._auth, self._password_only)
        elif self._auth is not None:
            setup.append(pipe.send(_pack(("AUTH", *self._auth))))
        if self._db:
            setup.append(pipe.send(_pack(("SELECT", self._db))))
        if self._client_name:
            setup.append(pipe.send(_pack(("CLIENT", "SETNAME", self._client_name))))
        try:
            for reply in setup:
                _checked(await reply)
        finally:
            for reply in setup:  # those behind a refusal fail with the connection: retrieved
                if reply.done() and not reply.cancelled():
                    reply.exception()

    async def aclose(self) -> None:
        async with self._connecting:  # a connect under way would leave its connection open
            if self._pipe is not None:
                self._pipe.close(RedisConnectionError("redis client closed"))
                self._pipe = None


def _pack(args: tuple[str | bytes | int, ...]) -> bytes:
    # hiredis's stub types its argument as a 1-tuple; it takes any number of items.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


async def _auth_either_way(pipe: _Pipeline, auth: tuple[str, str], password: str) -> None:
    """AUTH default <password>, or on a server too old for users (Redis 5, which says "wrong
    number of arguments") AUTH <password>, as redis-py does. Awaited alone: the commands behind
    a refused AUTH would fail with NOAUTH."""
    try:
        _checked(await pipe.send(_pack(("AUTH", *auth))))
    except ResponseError as e:
        if "wrong number of arguments" not in str(e).lower():
            raise
        _checked(await pipe.send(_pack(("AUTH", password))))


def _checked(reply: Reply) -> Reply:
    if isinstance(reply, hiredis.ReplyError):
        message = str(reply)
        if message.startswith("NOSCRIPT"):
            raise NoScriptError(message)
        raise ResponseError(message)
    return reply
