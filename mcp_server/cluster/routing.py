"""Image affinity: calls about one image go to the model replica that already holds its vision features and SAM
embedding (the runner caches both by the image's hash), while that replica is up and has room.

Ray Serve's own request-router hook (a :class:`~ray.serve.request_router.RequestRouter` named in the deployment's
``request_router_config``) does the routing, so replica membership, health, queue-length probing and back-off stay
Serve's. What it adds is the order: replicas ranked by rendezvous (highest-random-weight) hashing of the call's
``route_key`` (the image's sha256). Rendezvous rather than a hash ring because it needs no ring state and moves only
the keys of a replica that leaves: when a replica dies or is full, its images go to each key's next-ranked replica and
every other image stays where its encodings are. Calls without a key (``affinity`` off) are spread round robin.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """``replicas`` (ids) from the most to the least preferred for ``key``: each id's weight is a hash of key and id."""

    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


try:  # the router class exists only where Ray Serve is installed; the ordering above is plain Python
    from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica
except ImportError:  # pragma: no cover - the cluster extra is not installed
    pass
else:

    class ImageAffinityRouter(FIFOMixin, RequestRouter):  # pyright: ignore[reportUntypedBaseClass]
        """Ranks the candidate replicas for a call by :func:`rendezvous_order` of its ``route_key`` keyword; Serve
        tries them in that order (a replica at its ``max_ongoing_requests`` is passed over for the next)."""

        _turn = itertools.count()

        async def choose_replicas(
            self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
        ) -> list[list[RunningReplica]]:
            if not candidate_replicas:
                return []
            by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
            key = pending_request.kwargs.get("route_key") if pending_request is not None else None
            if isinstance(key, str):
                order = rendezvous_order(key, list(by_id))
            else:  # no image to follow: take turns
                ids = sorted(by_id)
                start = next(self._turn) % len(ids)
                order = ids[start:] + ids[:start]
            return [[by_id[replica_id]] for replica_id in order]
