"""Cluster fixtures: a real redis-server on a loopback port (started and stopped here). The test modules skip with
the reason when redis-server or the cluster extra is missing; ``.ci/run`` installs both, so in CI these tests run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster_support import RedisProcess


@pytest.fixture(scope="session")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_process: RedisProcess) -> str:
    """The Redis URL, emptied before each test."""
    if redis_process.process is None:
        redis_process.start()
    import redis

    client = redis.Redis.from_url(redis_process.url)
    client.flushall()
    client.close()
    return redis_process.url
