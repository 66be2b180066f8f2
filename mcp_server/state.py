"""What every connection shares: the settings, one executor (one model), the handle stores and the image policy.

Tools reach it through the SDK's typed lifespan context (:data:`AppContext`); the server object keeps it too, for the
command line and tests. No torch here: the model loads through the runner factory, in the executor's worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from mcp.server.connection import Connection
from mcp.server.mcpserver import Context

from mcp_server.decode_pool import DecodePool
from mcp_server.executor import Executor, Runner
from mcp_server.image_io import ImagePolicy
from mcp_server.settings import Settings
from mcp_server.stores import BoundedStore, ImageHandles, ImageStore, Owner, PictureHandles, StoredPicture
from nextchat.resizing import InputSides
from nextchat.scopes import scope_of_argument


MAX_MASKS, MAX_MASK_BYTES = 4096, 512 << 20
MAX_OVERLAYS, MAX_OVERLAY_BYTES = 256, 128 << 20
READER_THREADS = 16  # image reads and URL fetches in flight; their threads are apart from the shared pool
SESSION_QUEUE_SHARE = 4  # over HTTP, one session may hold at most 1/4 of the queue's places


@dataclass(frozen=True)
class PublicModelName:
    """How results name the model, and the spellings of its location that must not reach a caller.

    A hub id or ``demo`` is shown as given; a local checkpoint directory only by its last component, since the
    caller may not read the server's filesystem.
    """

    name: str
    locations: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: str) -> PublicModelName:
        path = Path(model).expanduser()
        if not (path.is_absolute() or model.startswith((".", "~")) or path.exists()):
            return cls(model)
        spellings = {model, str(path), os.path.abspath(path), os.path.realpath(path)}
        return cls(path.name or model, tuple(sorted(spellings - {path.name}, key=len, reverse=True)))

    def redact(self, text: str) -> str:
        """``text`` with every spelling of the checkpoint's location replaced by its public name."""
        for location in self.locations:
            text = text.replace(location, self.name)
        return text


def default_runner_factory(settings: Settings) -> Callable[[], Runner]:
    """Loads NExT-Chat in the worker thread (the only place the server imports torch)."""

    def build() -> Runner:
        from mcp_server.runner import NextChatRunner

        return NextChatRunner.load(
            settings.model,
            settings.device,
            settings.dtype,
            quantize=settings.quantize,
            fixed_new_tokens=settings.fixed_new_tokens,
            cpu_threads=settings.cpu_threads,
            cuda_graphs=settings.cuda_graphs,
        )

    return build


def _picture_size(item: StoredPicture) -> int:
    return len(item.data)


@dataclass
class AppState:
    """The server's shared state. Build it with :meth:`create`; the model starts loading at :meth:`start`."""

    settings: Settings
    executor: Executor
    images: ImageHandles
    masks: PictureHandles
    overlays: PictureHandles
    policy: ImagePolicy
    model: PublicModelName
    decoder: DecodePool
    scope: str = field(default="")  # what --model knows, read before loading (the loaded model's own is in runner_info)
    started: bool = field(default=False, init=False)
    _readers: anyio.CapacityLimiter | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, settings: Settings, runner_factory: Callable[[], Runner] | None = None) -> AppState:
        executor = Executor(
            runner_factory or default_runner_factory(settings),
            max_queue=settings.max_queue,
            max_active=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue_per_owner=max(1, settings.max_queue // SESSION_QUEUE_SHARE),
        )
        return cls(
            settings=settings,
            executor=executor,
            images=ImageStore(ttl_s=settings.handle_ttl_s),
            masks=BoundedStore(MAX_MASKS, MAX_MASK_BYTES, settings.handle_ttl_s, _picture_size),
            overlays=BoundedStore(MAX_OVERLAYS, MAX_OVERLAY_BYTES, settings.handle_ttl_s, _picture_size),
            policy=ImagePolicy(
                allowed_dirs=settings.allow_dirs, allow_urls=settings.allow_urls, allow_http=settings.allow_http
            ),
            model=PublicModelName.of(settings.model),
            decoder=DecodePool(settings.decode_workers, settings.decode_memory_mib << 20),
            scope=scope_of_argument(settings.model).scope,
        )

    def start(self) -> None:
        """Start the executor (it loads the model in its worker thread); once per process."""
        if not self.started:
            self.started = True
            self.executor.start()

    def reader_limiter(self) -> anyio.CapacityLimiter:
        """The threads that read image files and fetch URLs (made in the event loop, at first use): slow fetches
        wait among themselves, never in the thread pool that the SDK runs synchronous handlers in."""
        if self._readers is None:
            self._readers = anyio.CapacityLimiter(READER_THREADS)
        return self._readers

    def model_label(self) -> str:
        """The model as results name it: the public name, plus the checkpoint's own name when it differs."""
        name = self.executor.runner_info.get("model_name")
        return f"{self.model.name} ({name})" if name and name != self.model.name else self.model.name

    def model_scope(self) -> str:
        """What the model knows, as results state it: the loaded model's own sentence, or before it has loaded,
        the one its ``--model`` argument implies."""
        scope = self.executor.runner_info.get("scope")
        return scope if isinstance(scope, str) and scope else self.scope

    def input_sides(self) -> InputSides | None:
        """The sides of the loaded model's image inputs, for the decode workers' first resizes (``None`` before the
        model has loaded: the runner then resizes the image itself)."""
        sides = self.executor.runner_info.get("input_sides")
        return sides if isinstance(sides, InputSides) else None

    def public_error(self) -> str | None:
        """The executor's error with the checkpoint's location reduced to its name (the caller may not read it)."""
        error = self.executor.error
        return None if error is None else self.model.redact(error)


AppContext = Context[AppState]
"""What tools receive: the request's context, whose lifespan context is the :class:`AppState`."""


PRINCIPAL_SCOPE_KEY = "nextchat.principal"
"""Where an HTTP guard that checked the caller's bearer token leaves the principal it belongs to, in the ASGI scope's
``state`` (``mcp_server.cluster.auth`` does, for stateless serving)."""


def session_owner(ctx: Context[AppState] | Context) -> Owner:
    """The streamable-HTTP session a request arrived on; without one (stateless HTTP), the principal of the bearer
    token the request carried; else ``None`` (stdio, in-memory, stateless HTTP without tokens).

    Read from the connection the SDK built for the transport session, not from the ``Mcp-Session-Id`` header: on the
    stateless and 2026-07-28 HTTP paths that header reaches the tool unchecked, so it would let a client name itself
    any session. MCPServer's ``Context`` does not surface the connection, hence the lookup through the request's
    session object; a failed lookup is an error (the call fails) rather than silently unbinding handles.
    """
    connection: Connection = ctx.request_context.session._connection  # pyright: ignore[reportPrivateUsage]  # see above
    if connection.session_id is not None:
        return connection.session_id
    return request_principal(ctx.request_context.request)


def request_principal(request: object) -> Owner:
    """The principal a guard put in the HTTP request's scope (see :data:`PRINCIPAL_SCOPE_KEY`), or ``None``."""
    scope: object = getattr(request, "scope", None)
    if not isinstance(scope, dict):
        return None
    state: object = scope.get("state")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    principal: object = state.get(PRINCIPAL_SCOPE_KEY) if isinstance(state, dict) else None  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return f"principal:{principal}" if isinstance(principal, str) else None
