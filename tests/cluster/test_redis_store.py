"""The Redis handle store against a real redis-server: the same contract as the in-process stores."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mcp_server.messages import DecodedImage, PortableObject
from mcp_server.stores import MAX_OBJECTS_PER_IMAGE, StoredPicture


pytest.importorskip("redis", reason="the cluster extra is not installed: pip install -e '.[cluster]'")

from mcp_server.redis_store import HandleStoreUnavailable, RedisImageStore, RedisPictureStore, connect


def image(seed: int, width: int = 7, height: int = 5) -> DecodedImage:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return DecodedImage(pixels, f"{seed:064x}", source="data", format="PNG")


def state(seed: int, dim: int = 16) -> PortableObject:
    hidden = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return PortableObject("the red circle", (1.0, 2.0, 3.0, 4.0), (0.1, 0.2, 0.3, 0.4), hidden)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_an_image_round_trips_and_the_same_bytes_get_the_same_handle(redis_url: str) -> None:
    store = RedisImageStore(connect(redis_url))
    first = store.add(image(1), owner="a")
    assert store.add(image(1), owner="a").handle == first.handle
    again = RedisImageStore(connect(redis_url)).get(first.handle, owner="a")  # another process's client
    assert again is not None
    np.testing.assert_array_equal(again.image.pixels, image(1).pixels)
    assert (again.image.sha256, again.image.source, again.image.format) == (image(1).sha256, "data", "PNG")


def test_one_owner_never_sees_another_owners_handles(redis_url: str) -> None:
    store = RedisImageStore(connect(redis_url))
    mine = store.add(image(1), owner="a")
    assert store.get(mine.handle, owner="b") is None
    assert store.get(mine.handle, owner=None) is None
    theirs = store.add(image(1), owner="b")
    assert theirs.handle != mine.handle
    pictures = RedisPictureStore(connect(redis_url), "mask", max_entries=8)
    pictures.put(("a", "m1"), StoredPicture(b"png", "image/png", mine.handle))
    assert pictures.get(("b", "m1")) is None
    assert pictures.get(("a", "m1")) == StoredPicture(b"png", "image/png", mine.handle)


def test_objects_get_shared_ids_and_their_states_round_trip_exactly(redis_url: str) -> None:
    store = RedisImageStore(connect(redis_url))
    stored = store.add(image(2), owner="a")
    assert stored.add_object("the red circle", (1.0, 2.0, 3.0, 4.0), state(1)) == "o1"
    other = RedisImageStore(connect(redis_url)).get(stored.handle, owner="a")
    assert other is not None
    assert other.add_object("a square", (5.0, 6.0, 7.0, 8.0), state(2)) == "o2"  # the counter is shared
    found = stored.objects["o2"]
    assert (found.id, found.phrase, found.box) == ("o2", "a square", (5.0, 6.0, 7.0, 8.0))
    assert isinstance(found.state, PortableObject)
    np.testing.assert_array_equal(found.state.at_hidden, state(2).at_hidden)
    assert found.state.square_box == state(2).square_box
    assert stored.objects.get("o3") is None
    assert list(stored.objects) == ["o1", "o2"]


def test_objects_are_bounded_per_image(redis_url: str) -> None:
    stored = RedisImageStore(connect(redis_url)).add(image(3), owner="a")
    for _ in range(MAX_OBJECTS_PER_IMAGE + 2):
        stored.add_object("x", (0.0, 0.0, 1.0, 1.0), state(0, dim=4))
    assert len(stored.objects) == MAX_OBJECTS_PER_IMAGE
    assert "o1" not in stored.objects and "o2" not in stored.objects and "o3" in stored.objects


def test_the_least_recently_used_image_goes_first_past_the_count_bound(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisImageStore(connect(redis_url), max_entries=2, clock=clock)
    first = store.add(image(1), owner="a")
    clock.now += 1
    second = store.add(image(2), owner="a")
    clock.now += 1
    assert store.get(first.handle, owner="a") is not None  # used again: now the most recent
    clock.now += 1
    store.add(image(3), owner="a")
    assert store.get(second.handle, owner="a") is None
    assert store.get(first.handle, owner="a") is not None
    other_owner = store.add(image(4), owner="b")  # bounds are per owner
    assert store.get(other_owner.handle, owner="b") is not None and store.get(first.handle, owner="a") is not None


def test_entries_expire_after_their_lifetime(redis_url: str) -> None:
    clock = FakeClock()
    client = connect(redis_url)
    store = RedisImageStore(client, ttl_s=60, clock=clock)
    old = store.add(image(1), owner="a")
    ttls = [client.ttl(key) for key in client.keys("*img:*")]
    assert ttls and all(0 < t <= 60 for t in ttls)  # Redis forgets the record itself after the lifetime
    clock.now += 61
    store.add(image(2), owner="a")  # the next insert also drops index entries past their lifetime
    assert store.get(old.handle, owner="a") is None
    masks = RedisPictureStore(client, "mask", max_entries=4, ttl_s=60)
    masks.put(("a", "m"), StoredPicture(b"x", "image/png", old.handle))
    assert 0 < client.ttl(next(iter(client.keys("*mask:m")))) <= 60


def test_masks_are_bounded_per_owner(redis_url: str) -> None:
    masks = RedisPictureStore(connect(redis_url), "mask", max_entries=3)
    for i in range(5):
        masks.put(("a", f"m{i}"), StoredPicture(bytes([i]), "image/png", "img"))
    assert [masks.get(("a", f"m{i}")) is not None for i in range(5)] == [False, False, True, True, True]


def test_an_unreachable_redis_is_a_clear_error_within_the_timeout() -> None:
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = RedisImageStore(connect(f"redis://127.0.0.1:{port}/0", timeout_s=1.0))
    started = time.monotonic()
    with pytest.raises(HandleStoreUnavailable, match="unreachable; retry"):
        store.add(image(1), owner="a")
    with pytest.raises(HandleStoreUnavailable):
        store.get("img_" + "0" * 32, owner="a")
    assert time.monotonic() - started < 5


def test_a_redis_that_accepts_but_never_answers_fails_within_the_socket_timeout() -> None:
    import socket

    with socket.socket() as silent:  # the kernel completes the handshake; nothing ever replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        store = RedisPictureStore(connect(url, timeout_s=0.5), "mask", max_entries=4)
        started = time.monotonic()
        with pytest.raises(HandleStoreUnavailable):
            store.get(("a", "m1"))
        assert time.monotonic() - started < 5
