"""The Redis backend's key store: tenants and hashed API keys in hashes under the store's namespace, on its
connection (the layout and the guarantees are in prefix_store/keys.py)."""
from __future__ import annotations

from prefix_store.keys import KeyRecord, Lookup, TenantRecord
from prefix_store.redis_conn import RedisConnection

# ARGV: prefix, key id ('' = none). Returns {number of tenants, key JSON | nil, tenant JSON | nil, namespace
# version | nil}.
LOOKUP = """
local p, id = ARGV[1], ARGV[2]
local n = redis.call('HLEN', p..':auth:tenants')
if id == '' then return {n} end
local k = redis.call('HGET', p..':auth:keys', id)
if not k then return {n} end
local t = cjson.decode(k)['tenant']
return {n, k, redis.call('HGET', p..':auth:tenants', t), redis.call('HGET', p..':auth:namespaces', t)}
"""


class RedisKeyStore:
    """Keys and tenants in Redis, on the backend's connection (see prefix_store/keys.py for the layout)."""

    def __init__(self, conn: RedisConnection):
        self.conn, self.url = conn, conn.url
        self._tenants, self._keys = conn.key("auth", "tenants"), conn.key("auth", "keys")
        self._namespaces = conn.key("auth", "namespaces")
        self._lookup = conn.script(LOOKUP)

    async def lookup(self, key_id: str | None) -> Lookup:
        """One Lua script: tenant count, key record, tenant record."""
        res = await self.conn.run(self._lookup, key_id or "")
        key = KeyRecord.from_json(res[1]) if len(res) > 1 and res[1] else None
        tenant = TenantRecord.from_json(res[2]) if len(res) > 2 and res[2] else None
        version = int(res[3]) if len(res) > 3 and res[3] else 0
        return Lookup(int(res[0]) > 0, key, tenant, version)

    async def get_tenant(self, name: str) -> TenantRecord | None:
        """The tenant `name`, or None."""
        raw = await self.conn.call(self.conn.client.hget(self._tenants, name))
        return TenantRecord.from_json(raw) if raw else None

    async def put_tenant(self, tenant: TenantRecord) -> None:
        """Create or replace a tenant record."""
        await self.conn.call(self.conn.client.hset(self._tenants, tenant.name, tenant.to_json()))

    async def list_tenants(self) -> list[TenantRecord]:
        """Every tenant, by name."""
        raw = await self.conn.call(self.conn.client.hgetall(self._tenants))
        return [TenantRecord.from_json(v) for _, v in sorted(raw.items())]

    async def put_key(self, key: KeyRecord) -> None:
        """Store a new key record."""
        await self.conn.call(self.conn.client.hset(self._keys, key.id, key.to_json()))

    async def delete_key(self, key_id: str) -> KeyRecord | None:
        """Remove a key atomically (HGET + HDEL in one transaction); the removed record or None."""
        async with self.conn.client.pipeline(transaction=True) as pipe:
            pipe.hget(self._keys, key_id)
            pipe.hdel(self._keys, key_id)
            raw, _ = await self.conn.call(pipe.execute())
        return KeyRecord.from_json(raw) if raw else None

    async def list_keys(self) -> list[KeyRecord]:
        """Every key record, oldest first."""
        raw = await self.conn.call(self.conn.client.hgetall(self._keys))
        return sorted((KeyRecord.from_json(v) for v in raw.values()), key=lambda k: k.created)

    async def namespace_changed(self, tenant: str) -> None:
        """HINCRBY, atomic across replicas."""
        await self.conn.call(self.conn.client.hincrby(self._namespaces, tenant, 1))
