"""Handles in Redis, so that every server process of a cluster sees the same images, objects, masks and overlays.

The same contract as :mod:`mcp_server.stores`: handles are unguessable, bound to their owner (the MCP session, or the
bearer token's principal when serving statelessly), bounded in count and forgotten after ``ttl_s`` of disuse. Keys:

- ``{prefix}:{owner}:images``: sorted set of the owner's image handles by last use (the count bound and LRU order);
- ``{prefix}:{owner}:img:{handle}``: hash with the image (raw RGB pixels, height, width, sha256, source, format) and
  ``next_object``, the counter object ids are drawn from;
- ``{prefix}:{owner}:sha:{sha256}``: the owner's handle for that content (the same bytes sent again, the same handle);
- ``{prefix}:{owner}:obj:{handle}``: hash of the image's objects (``o1``...): phrase, pixel box and ``<at>`` state;
- ``{prefix}:{owner}:masks`` / ``:overlays``: sorted sets by last use; ``:mask:{id}`` / ``:overlay:{id}``: the picture.

``owner`` in a key is a hash of the owner, so nothing a client sends shapes a key. Inserts and their evictions run in
one Lua script (atomic per owner); every key gets ``EXPIRE ttl_s``, refreshed on use. Redis's ``maxmemory`` bounds the
bytes overall (see deploy/README.md). An unreachable Redis is a :class:`HandleStoreUnavailable` (a tool error that says
to retry) within the client's socket timeouts, never a hang; calls succeed again once Redis is back.

The ``<at>`` states travel as :class:`~mcp_server.messages.PortableObject` (float32 bytes, no torch): the cluster's
model replicas hand them out and take them back in that form.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, cast

import numpy as np
import redis
from mcp.server.mcpserver.exceptions import ToolError

from mcp_server.messages import DecodedImage, PortableObject
from mcp_server.stores import MAX_OBJECTS_PER_IMAGE, Owner, StoredImage, StoredObject, StoredPicture, new_handle


# KEYS[1]: the owner's index (sorted set), KEYS[2]: the record. ARGV: now, ttl, max entries, member, owner key prefix,
# kind, then field/value pairs of the record. Writes the record, then evicts expired and least recently used members
# past the bound, with the keys that hang off them.
PUT_BOUNDED = """
local now, ttl, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local member, prefix, kind = ARGV[4], ARGV[5], ARGV[6]
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('EXPIRE', KEYS[2], ttl)
local function forget(m)
  local key = prefix .. kind .. ':' .. m
  if kind == 'img' then
    local sha = redis.call('HGET', key, 'sha256')
    if sha and redis.call('GET', prefix .. 'sha:' .. sha) == m then redis.call('DEL', prefix .. 'sha:' .. sha) end
    redis.call('DEL', prefix .. 'obj:' .. m)
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], m)
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl)) do forget(m) end
redis.call('ZADD', KEYS[1], now, member)
local over = redis.call('ZCARD', KEYS[1]) - limit
if over > 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do forget(m) end
end
redis.call('EXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS[1]: the image record, KEYS[2]: its objects. ARGV: ttl, most objects kept, the object's record. Draws the next id,
# stores the object and forgets the oldest past the bound (ids grow by one, so the oldest is id - limit).
ADD_OBJECT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local n = redis.call('HINCRBY', KEYS[1], 'next_object', 1)
redis.call('HSET', KEYS[2], 'o' .. n, ARGV[3])
local old = n - tonumber(ARGV[2])
if old > 0 then redis.call('HDEL', KEYS[2], 'o' .. old) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return n
"""


class HandleStoreUnavailable(ToolError):
    """Redis could not be reached (or answered too slowly); the call may be retried."""

    def __init__(self) -> None:
        super().__init__("the shared handle store (Redis) is unreachable; retry in a few seconds")


def connect(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A Redis client for ``url`` whose every command fails within about ``timeout_s`` when Redis is down."""
    return redis.Redis.from_url(  # pyright: ignore[reportUnknownMemberType]  # redis-py leaves **kwargs untyped
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
    )


def owner_key(prefix: str, owner: Owner) -> str:
    """The key prefix of one owner: a hash of the owner, so client-chosen text never shapes a key."""
    digest = hashlib.sha256(("" if owner is None else f"={owner}").encode()).hexdigest()[:32]
    return f"{prefix}:{digest}:"


class _Redis:
    """The client, with errors from an unreachable Redis turned into :class:`HandleStoreUnavailable`."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float, clock: Callable[[], float]) -> None:
        self.client, self.prefix, self.ttl = client, prefix, max(1, round(ttl_s))
        self.clock = clock
        self._put = client.register_script(PUT_BOUNDED)
        self._add_object = client.register_script(ADD_OBJECT)

    def call(self, operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise HandleStoreUnavailable() from error

    def put_bounded(self, owner: Owner, kind: str, index: str, member: str, limit: int, record: dict[str, Any]):
        base = owner_key(self.prefix, owner)
        fields: list[Any] = [v for pair in record.items() for v in pair]
        args = [self.clock(), self.ttl, limit, member, base, kind, *fields]
        return self.call(lambda: self._put(keys=[base + index, f"{base}{kind}:{member}"], args=args))

    def add_object(self, image_key: str, objects_key: str, record: bytes) -> int | None:
        args = [self.ttl, MAX_OBJECTS_PER_IMAGE, record]
        n = self.call(lambda: self._add_object(keys=[image_key, objects_key], args=args))
        return None if n is None else int(n)


def encode_object(phrase: str, box: tuple[float, float, float, float], state: object) -> bytes:
    """An object record: a JSON line (phrase, box, the state's square box and width), then the ``<at>`` state as
    little-endian float32."""
    if not isinstance(state, PortableObject):
        raise TypeError("objects kept in Redis need a PortableObject state (the cluster's model replicas give them)")
    hidden = np.ascontiguousarray(state.at_hidden, dtype="<f4")
    head = {"phrase": phrase, "box": list(box), "square_box": list(state.square_box), "dim": int(hidden.size)}
    return json.dumps(head).encode() + b"\n" + hidden.tobytes()


def decode_object(object_id: str, data: bytes) -> StoredObject:
    head_bytes, _, hidden = data.partition(b"\n")
    head = json.loads(head_bytes)
    at_hidden = np.frombuffer(hidden, dtype="<f4", count=int(head["dim"])).astype(np.float32)
    box = cast(tuple[float, float, float, float], tuple(float(v) for v in head["box"]))
    square = cast(tuple[float, float, float, float], tuple(float(v) for v in head["square_box"]))
    state = PortableObject(head["phrase"], box, square, at_hidden)
    return StoredObject(object_id, head["phrase"], box, state)


class RedisObjects(MutableMapping[str, StoredObject]):
    """The objects of one image, read from and written to its Redis hash (ids ``o1``, ``o2``...)."""

    def __init__(self, store: _Redis, image_key: str, objects_key: str) -> None:
        self._store, self._image_key, self._key = store, image_key, objects_key

    def add(self, phrase: str, box: tuple[float, float, float, float], state: object) -> str:
        n = self._store.add_object(self._image_key, self._key, encode_object(phrase, box, state))
        if n is None:
            raise ToolError("the image id expired while the call ran; call the tool again with the image itself")
        return f"o{n}"

    def __getitem__(self, object_id: str) -> StoredObject:
        data = self._store.call(lambda: self._store.client.hget(self._key, object_id))
        if data is None:
            raise KeyError(object_id)
        return decode_object(object_id, cast(bytes, data))

    def __setitem__(self, object_id: str, value: StoredObject) -> None:
        record = encode_object(value.phrase, value.box, value.state)
        self._store.call(lambda: self._store.client.hset(self._key, object_id, record))

    def __delitem__(self, object_id: str) -> None:
        self._store.call(lambda: self._store.client.hdel(self._key, object_id))

    def __iter__(self) -> Iterator[str]:
        keys = cast(list[bytes], self._store.call(lambda: self._store.client.hkeys(self._key)))
        return iter(sorted((k.decode() for k in keys), key=lambda k: int(k[1:])))

    def __len__(self) -> int:
        return int(self._store.call(lambda: self._store.client.hlen(self._key)))


class RedisStoredImage(StoredImage):
    """An image whose objects live in Redis: ids come from the shared counter, so two processes never reuse one."""

    def add_object(self, phrase: str, box: tuple[float, float, float, float], state: object) -> str:
        objects = self.objects
        if not isinstance(objects, RedisObjects):
            raise TypeError("a RedisStoredImage keeps its objects in a RedisObjects")
        return objects.add(phrase, box, state)


class RedisImageStore:
    """Images by owner and handle in Redis, deduplicated by content within an owner (see the module docstring).

    Args:
        client: a client from :func:`connect` (its socket timeouts bound every call).
        prefix: the first part of every key (several deployments may share one Redis).
        max_entries: most images kept per owner.
        ttl_s: seconds an image (with its objects) lives after it was last used.
        clock: wall-clock seconds (sorted-set scores; shared by processes, so not a monotonic clock).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "nextchat",
        max_entries: int = 256,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = _Redis(client, prefix, ttl_s, clock)
        self.max_entries = max_entries
        self._ttl_s = ttl_s

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    def add(self, image: DecodedImage, owner: Owner = None) -> StoredImage:
        """The owner's handle for ``image``: the one it already has for the same bytes, else a new one."""
        base = owner_key(self._redis.prefix, owner)
        known = self._redis.call(lambda: self._redis.client.get(f"{base}sha:{image.sha256}"))
        if known is not None:
            stored = self.get(cast(bytes, known).decode(), owner)
            if stored is not None:
                return stored
        handle = new_handle("img_")
        pixels = np.ascontiguousarray(image.pixels, dtype=np.uint8)
        record = {
            "pixels": pixels.tobytes(), "height": image.height, "width": image.width, "sha256": image.sha256,
            "source": image.source, "format": image.format, "next_object": 0,
        }  # fmt: skip
        self._redis.put_bounded(owner, "img", "images", handle, self.max_entries, record)
        ttl = self._redis.ttl
        self._redis.call(lambda: self._redis.client.set(f"{base}sha:{image.sha256}", handle, ex=ttl))
        return self._record(base, handle, image)

    def get(self, handle: str, owner: Owner = None) -> StoredImage | None:
        """The image behind ``handle`` if ``owner`` created it and it is still alive (its lifetime refreshed)."""
        base = owner_key(self._redis.prefix, owner)
        fields = cast(dict[bytes, bytes], self._redis.call(lambda: self._redis.client.hgetall(f"{base}img:{handle}")))
        if not fields:
            return None
        self._touch(base, handle, fields[b"sha256"].decode())
        height, width = int(fields[b"height"]), int(fields[b"width"])
        pixels = np.frombuffer(fields[b"pixels"], dtype=np.uint8).reshape(height, width, 3).copy()
        image = DecodedImage(
            pixels, fields[b"sha256"].decode(), source=fields[b"source"].decode(), format=fields[b"format"].decode()
        )
        return self._record(base, handle, image)

    def __len__(self) -> int:
        """Images kept for the anonymous owner (the others' counts are theirs alone)."""
        base = owner_key(self._redis.prefix, None)
        return int(self._redis.call(lambda: self._redis.client.zcard(base + "images")))

    def _record(self, base: str, handle: str, image: DecodedImage) -> StoredImage:
        objects = RedisObjects(self._redis, f"{base}img:{handle}", f"{base}obj:{handle}")
        return RedisStoredImage(handle, image, objects)

    def _touch(self, base: str, handle: str, sha256: str) -> None:
        ttl, client = self._redis.ttl, self._redis.client

        def refresh() -> None:
            with client.pipeline(transaction=True) as pipe:  # pyright: ignore[reportUnknownMemberType]
                pipe.zadd(base + "images", {handle: self._redis.clock()})
                for key in (f"{base}img:{handle}", f"{base}obj:{handle}", f"{base}sha:{sha256}", base + "images"):
                    pipe.expire(key, ttl)
                pipe.execute()

        self._redis.call(refresh)


class RedisPictureStore:
    """Masks (``kind="mask"``) or overlays (``kind="overlay"``) by owner and id in Redis, bounded per owner."""

    def __init__(
        self,
        client: redis.Redis,
        kind: str,
        max_entries: int,
        prefix: str = "nextchat",
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = _Redis(client, prefix, ttl_s, clock)
        self.kind, self.max_entries = kind, max_entries

    def put(self, key: tuple[Owner, str], value: StoredPicture) -> None:
        owner, picture_id = key
        record = {"data": value.data, "mime_type": value.mime_type, "image_handle": value.image_handle}
        self._redis.put_bounded(owner, self.kind, f"{self.kind}s", picture_id, self.max_entries, record)

    def get(self, key: tuple[Owner, str]) -> StoredPicture | None:
        owner, picture_id = key
        base = owner_key(self._redis.prefix, owner)
        record_key, ttl, client = f"{base}{self.kind}:{picture_id}", self._redis.ttl, self._redis.client

        def read() -> list[Any]:
            with client.pipeline(transaction=True) as pipe:  # pyright: ignore[reportUnknownMemberType]
                pipe.hgetall(record_key)
                pipe.expire(record_key, ttl)
                pipe.zadd(f"{base}{self.kind}s", {picture_id: self._redis.clock()}, xx=True)
                return pipe.execute()

        fields = cast(dict[bytes, bytes], self._redis.call(read)[0])
        if not fields:
            return None
        return StoredPicture(fields[b"data"], fields[b"mime_type"].decode(), fields[b"image_handle"].decode())
