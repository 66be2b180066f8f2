"""Bounded, expiring stores behind the handles the tools hand out (images, objects, masks, overlays).

Handles are unguessable (128 random bits). Every store is bounded by entry count and by bytes and forgets entries
after a lifetime; a forgotten handle reads as "not found", and the tools say to call again with the image.
Over streamable HTTP every handle is also bound to the session that created it: stores are keyed by
``(owner, handle)``, so a handle presented by another session is simply absent (no refresh, no hint it exists).
Thread-safe: the tools run on the event loop, the model in a worker thread.

The classes here keep handles in this process (one machine, the default). :class:`ImageHandles` and
:class:`PictureHandles` are what the tools need of a store; ``mcp_server.redis_store`` implements them on Redis, so that
several server processes (``mcp_server.cluster``) share one set of handles.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, MutableMapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from mcp_server.messages import DecodedImage
from nextchat.tasks import Box


V = TypeVar("V")
MAX_OBJECTS_PER_IMAGE = 256
Owner = str | None
"""The transport session a handle belongs to; ``None`` where there is one client per process (stdio, in-memory) or no
session at all (stateless HTTP)."""


def new_handle(prefix: str) -> str:
    """``prefix`` + 32 hex digits (128 random bits): URI-safe, unguessable."""
    return f"{prefix}{secrets.token_hex(16)}"


class BoundedStore(Generic[V]):
    """An LRU map with a count cap, a byte cap and a time-to-live; keys are any hashable (handles, or owner + handle).

    Args:
        max_entries: most entries kept.
        max_bytes: most bytes kept, as measured by ``size_of``.
        ttl_s: seconds an entry lives after it was last written or read.
        size_of: an entry's size in bytes.
        clock: time source (tests pass a fake one).
    """

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        size_of: Callable[[V], int] = lambda _: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._size_of, self._clock = size_of, clock
        self._items: OrderedDict[Hashable, tuple[V, int, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` under ``key`` (replacing any), then evict expired and least recently used entries."""
        size = self._size_of(value)
        with self._lock:
            self._pop(key)
            self._items[key] = (value, size, self._clock())
            self._bytes += size
            self._evict()

    def get(self, key: Hashable) -> V | None:
        """The value, or ``None`` when unknown or expired; a hit refreshes its lifetime and recency."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            value, size, stamp = item
            now = self._clock()
            if now - stamp > self.ttl_s:
                self._pop(key)
                return None
            self._items[key] = (value, size, now)
            self._items.move_to_end(key)
            return value

    def __contains__(self, key: object) -> bool:
        """Presence without refreshing the entry (expired entries count as absent)."""
        with self._lock:
            item = self._items.get(key) if isinstance(key, Hashable) else None
            return item is not None and self._clock() - item[2] <= self.ttl_s

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _pop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, (_, _, stamp) in self._items.items() if now - stamp > self.ttl_s]:
            self._pop(key)
        while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
            self._pop(next(iter(self._items)))


@dataclass
class StoredImage:
    """An image behind a handle, with the objects located in it (ids ``o1``, ``o2``, ... scoped to the handle)."""

    handle: str
    image: DecodedImage
    objects: MutableMapping[str, StoredObject] = field(default_factory=lambda: dict[str, StoredObject]())
    _next_object: int = 1

    def add_object(self, phrase: str, box: Box, state: object) -> str:
        """Keep a located object and return its id; the oldest go first past :data:`MAX_OBJECTS_PER_IMAGE`."""
        object_id = f"o{self._next_object}"
        self._next_object += 1
        self.objects[object_id] = StoredObject(object_id, phrase, box, state)
        while len(self.objects) > MAX_OBJECTS_PER_IMAGE:
            del self.objects[next(iter(self.objects))]
        return object_id


@dataclass(frozen=True)
class StoredObject:
    """A located object: what ``segment_object``/``describe_region`` need to reuse it by id."""

    id: str
    phrase: str
    box: Box
    state: object = field(repr=False)


@dataclass(frozen=True)
class StoredPicture:
    """Encoded picture bytes behind a ``mask://`` (PNG) or ``overlay://`` (JPEG) handle, and the image they show."""

    data: bytes
    mime_type: str
    image_handle: str


class ImageStore:
    """Images by owner and handle, deduplicated by content within an owner: the same bytes sent again by the same
    session get the same handle while it lives; another session gets its own handle (and its own object ids)."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 2 << 30, ttl_s: float = 3600.0) -> None:
        self._store: BoundedStore[StoredImage] = BoundedStore(
            max_entries, max_bytes, ttl_s, size_of=lambda r: r.image.nbytes
        )
        self._by_content: dict[tuple[Owner, str], tuple[Owner, str]] = {}
        self._lock = threading.Lock()

    @property
    def ttl_s(self) -> float:
        return self._store.ttl_s

    def add(self, image: DecodedImage, owner: Owner = None) -> StoredImage:
        """The owner's handle for ``image``: the one it already has for the same bytes, else a new one."""
        with self._lock:
            key = self._by_content.get((owner, image.sha256))
            record = self._store.get(key) if key else None
            if record is None:
                record = StoredImage(new_handle("img_"), image)
                key = (owner, record.handle)
                self._store.put(key, record)
                self._by_content[(owner, image.sha256)] = key
                # Forget content keys whose handle has been evicted, so the index stays bounded too.
                self._by_content = {c: k for c, k in self._by_content.items() if k in self._store}
            return record

    def get(self, handle: str, owner: Owner = None) -> StoredImage | None:
        """The image behind ``handle`` if ``owner`` created it and it is still alive, else ``None``."""
        return self._store.get((owner, handle))

    def __len__(self) -> int:
        return len(self._store)


class ImageHandles(Protocol):
    """What the tools need of an image store (:class:`ImageStore` here, ``RedisImageStore`` across processes)."""

    @property
    def ttl_s(self) -> float: ...

    def add(self, image: DecodedImage, owner: Owner = None) -> StoredImage:
        """The owner's handle for ``image``: the one it already has for the same bytes, else a new one."""
        ...

    def get(self, handle: str, owner: Owner = None) -> StoredImage | None:
        """The image behind ``handle`` if ``owner`` created it and it is still alive, else ``None``."""
        ...

    def __len__(self) -> int: ...


class PictureHandles(Protocol):
    """What the tools need of a mask or overlay store, keyed by ``(owner, handle)``."""

    def put(self, key: tuple[Owner, str], value: StoredPicture) -> None: ...

    def get(self, key: tuple[Owner, str]) -> StoredPicture | None: ...
