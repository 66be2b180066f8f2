"""T17-T18: handle stores stay within their count, byte and time bounds, handles cannot be guessed, and an owner
(an HTTP session) sees only its own entries."""

import re

import numpy as np

from mcp_server.messages import DecodedImage
from mcp_server.stores import BoundedStore, ImageStore, new_handle


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pixels(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_entries_beyond_the_count_cap_evict_the_least_recently_used() -> None:
    store: BoundedStore[int] = BoundedStore(max_entries=3, max_bytes=1 << 20, ttl_s=60)
    for key in "abc":
        store.put(key, 1)
    assert store.get("a") == 1  # now the most recently used
    store.put("d", 1)
    assert "b" not in store and all(k in store for k in "acd") and len(store) == 3


def test_entries_beyond_the_byte_cap_are_evicted_and_the_total_stays_under_it() -> None:
    store: BoundedStore[bytes] = BoundedStore(max_entries=100, max_bytes=1000, ttl_s=60, size_of=len)
    for i in range(20):
        store.put(i, bytes(300))
        assert store.nbytes <= 1000
    assert len(store) == 3 and store.nbytes == 900
    store.put("huge", bytes(5000))  # larger than the whole budget: kept nowhere
    assert store.nbytes <= 1000 and "huge" not in store


def test_entries_expire_after_their_lifetime_of_disuse() -> None:
    clock = FakeClock()
    store: BoundedStore[int] = BoundedStore(max_entries=10, max_bytes=1 << 20, ttl_s=60, clock=clock)
    store.put("kept", 1)
    store.put("dropped", 2)
    clock.now = 50
    assert store.get("kept") == 1  # a read renews the lifetime
    clock.now = 100
    assert store.get("kept") == 1 and store.get("dropped") is None
    store.put("other", 3)  # writes sweep expired entries
    assert len(store) == 2


def test_handles_are_128_random_bits_and_guesses_find_nothing() -> None:
    handles = {new_handle("img_") for _ in range(10_000)}
    assert len(handles) == 10_000 and all(re.fullmatch(r"img_[0-9a-f]{32}", h) for h in handles)
    images = ImageStore()
    record = images.add(DecodedImage(pixels(0), "sha-0"))
    guesses = [new_handle("img_") for _ in range(10_000)]
    assert record.handle not in guesses and all(images.get(g) is None for g in guesses)


def test_an_owner_sees_only_its_own_images_and_the_same_bytes_get_a_handle_per_owner() -> None:
    images = ImageStore()
    alice = images.add(DecodedImage(pixels(1), "sha-1"), owner="session-a")
    assert (
        images.add(DecodedImage(pixels(1), "sha-1"), owner="session-a") is alice
    )  # same owner, same bytes: same handle
    bob = images.add(DecodedImage(pixels(1), "sha-1"), owner="session-b")
    assert bob.handle != alice.handle
    alice.add_object("the cat", (0, 0, 4, 4), state=None)
    assert images.get(alice.handle, "session-a") is alice
    assert images.get(alice.handle, "session-b") is None and images.get(alice.handle) is None
    assert images.get(bob.handle, "session-b").objects == {}  # no objects leak through shared content


def test_the_image_store_and_its_content_index_stay_bounded() -> None:
    images = ImageStore(max_entries=5, max_bytes=1 << 20)
    for i in range(50):
        images.add(DecodedImage(pixels(i), f"sha-{i}"), owner=f"session-{i % 3}")
    assert len(images) == 5 and len(images._by_content) == 5
