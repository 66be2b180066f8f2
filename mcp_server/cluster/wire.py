"""What crosses from the ingress to a model replica and back: plain picklable records (no events, no clocks).

A job's ``cancelled`` event and its monotonic deadline belong to one process; the ingress sends the time left
instead, and cancellation travels as Ray Serve's own request cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcp_server.messages import DecodedImage, GenerationOutcome, MaskOutcome, MaskPrompt
from nextchat.tasks import TaskPrompt


@dataclass(frozen=True)
class RemoteGeneration:
    """A :class:`~mcp_server.messages.GenerationJob` in transit; ``timeout_s``: seconds left to its deadline."""

    image: DecodedImage
    prompt: TaskPrompt
    max_new_tokens: int
    timeout_s: float | None


@dataclass(frozen=True)
class RemoteMask:
    """A :class:`~mcp_server.messages.MaskJob` in transit (object states as ``PortableObject``)."""

    image: DecodedImage
    prompts: tuple[MaskPrompt, ...]
    timeout_s: float | None


@dataclass(frozen=True)
class ReplicaAnswer:
    """A model replica's outcome, with the replica that computed it and what its runner reports (for ``status``)."""

    outcome: GenerationOutcome | MaskOutcome
    replica: str
    runner_info: dict[str, object]
