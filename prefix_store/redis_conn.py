"""One Redis connection pool of a store backend, shared by its prefix, key and counter stores (prefix_store/backend.py).

It owns the namespace P (default "prefixserve"; `?prefix=NAME` in the URL) under which every key is named, the
bound on every call (`?timeout=S`, default 2 s: a call waits at most twice that, plus one second), and the mapping
of Redis failures to StoreError (StoreUnavailable when Redis cannot be reached).
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prefix_store.base import StoreError, StoreUnavailable, store_options

logger = logging.getLogger(__name__)

PASSWORD_ENV = "PREFIXSERVE_REDIS_PASSWORD"
DEFAULT_NAMESPACE = "prefixserve"


def _public_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


class RedisConnection:
    """A bounded connection pool to one Redis and one key namespace; `call` maps failures to StoreError."""

    def __init__(self, url: str, *, prefix: str | None = None, timeout: float | str | None = None):
        base, opts = store_options(url)
        self.prefix = prefix or opts.get("prefix") or DEFAULT_NAMESPACE
        self.timeout = float(timeout or opts.get("timeout") or 2.0)
        self.url = _public_url(base.rstrip("?")) + ("" if self.prefix == DEFAULT_NAMESPACE
                                                    else f"?prefix={self.prefix}")
        kwargs: dict[str, Any] = {}
        if urlsplit(base).password is None and os.environ.get(PASSWORD_ENV):
            kwargs["password"] = os.environ[PASSWORD_ENV]
        # a blocking pool: a burst of requests waits (bounded) for a connection instead of failing; one immediate
        # retry: a pooled connection left over from before a Redis restart fails once, then reconnects
        pool = aioredis.BlockingConnectionPool.from_url(
            base.rstrip("?"), max_connections=64, timeout=self.timeout, socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 1), **kwargs)
        self.client = aioredis.Redis.from_pool(pool)  # closing the client closes the pool

    def key(self, *parts: str) -> str:
        """The name of a key in this namespace: P:part:part..."""
        return ":".join((self.prefix, *parts))

    def script(self, source: str) -> AsyncScript:
        """A Lua script registered on this connection (loaded into Redis on its first call)."""
        return self.client.register_script(source)

    async def run(self, script: AsyncScript, *args: Any) -> Any:
        """Call a script with ARGV = [namespace, *args], bounded like every call."""
        return await self.call(script(args=[self.prefix, *args]))

    async def call(self, coro: Any) -> Any:
        """Await one Redis operation with a hard deadline; map failures to StoreError/StoreUnavailable."""
        try:
            return await asyncio.wait_for(coro, self.timeout * 2 + 1)
        except (RedisConnectionError, RedisTimeoutError, asyncio.TimeoutError, OSError) as e:
            raise StoreUnavailable(f"redis store {self.url}: unreachable ({type(e).__name__}: {e})") from None
        except ResponseError as e:
            if isinstance(e, OutOfMemoryError) or "OOM" in str(e) or "maxmemory" in str(e):
                raise StoreError(f"redis store {self.url}: out of memory (maxmemory reached; free memory, raise "
                                 "maxmemory or delete prefixes)") from None
            raise StoreError(f"redis store {self.url}: {e}") from None
        except RedisError as e:
            raise StoreError(f"redis store {self.url}: {type(e).__name__}: {e}") from None

    async def close(self) -> None:
        """Close the connection pool."""
        try:
            await asyncio.wait_for(self.client.aclose(), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            logger.warning("redis store %s: close failed: %s", self.url, e)
