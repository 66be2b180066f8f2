"""The Ray Serve application: a stateless MCP ingress in front of the model deployment, handles in Redis.

``serve run mcp_server.cluster.app:build_app model_replicas=2 redis_url=redis://127.0.0.1:6379/0`` starts it on a
local Ray (deploy/serve_config.yaml is the same as a config file; deploy/rayservice.yaml for KubeRay). The MCP
endpoint is ``http://HOST:8000/mcp``.

The ingress serves the MCP streamable-HTTP app in stateless mode: no session lives in a replica, so any ingress
replica answers any request, and progress notifications still stream within a call's response. What a later call
needs (images, objects with their ``<at>`` states, masks, overlays) is in Redis, owned by the caller's token
principal. The tools run unchanged; their executor is a :class:`~mcp_server.cluster.remote.ModelClient`.
"""

# Ray Serve's decorators are typed loosely (serve.deployment returns a function type, RequestRouterConfig's field is
# typed as a dict although it takes the class): only those checks are off, and only in this file.
# pyright: reportUnknownMemberType=false, reportFunctionMemberAccess=false, reportUnknownArgumentType=false
# pyright: reportArgumentType=false

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from mcp_server.cluster.auth import ASGIApp, parse_tokens, principal_guard
from mcp_server.cluster.model import ModelReplica
from mcp_server.cluster.options import ClusterOptions
from mcp_server.cluster.remote import ModelClient
from mcp_server.cluster.routing import ImageAffinityRouter
from mcp_server.redis_store import RedisImageStore, RedisPictureStore, connect
from mcp_server.server import NextChatServer, create_server
from mcp_server.state import MAX_MASKS, MAX_OVERLAYS


MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT = "NextChatModel", "McpIngress"


def cluster_server(options: ClusterOptions, model: DeploymentHandle[Any]) -> NextChatServer:
    """The MCP server with its model on the deployment behind ``model`` and its handles in Redis."""
    settings = options.settings()
    server = create_server(settings)
    app = server.app
    app.executor = ModelClient(model, affinity=options.affinity)
    client = connect(options.redis_url, options.redis_timeout_s)
    ttl, prefix = settings.handle_ttl_s, options.redis_prefix
    app.images = RedisImageStore(client, prefix, ttl_s=ttl)
    app.masks = RedisPictureStore(client, "mask", MAX_MASKS, prefix, ttl)
    app.overlays = RedisPictureStore(client, "overlay", MAX_OVERLAYS, prefix, ttl)
    return server


def ingress_app(options: ClusterOptions, model: DeploymentHandle[Any]) -> ASGIApp:
    """The stateless streamable-HTTP app, behind the token guard when tokens are configured."""
    server = cluster_server(options, model)
    # DNS-rebinding protection is for servers on a loopback address; behind Serve's proxy the Host is the service's.
    app: ASGIApp = server.streamable_http_app(stateless_http=True, host="0.0.0.0")  # type: ignore[assignment]
    tokens = parse_tokens(os.environ.get(options.tokens_env, ""))
    return principal_guard(app, tokens) if tokens else app


class McpIngress:
    """The ingress deployment: builds the MCP app when the replica starts (Serve runs its lifespan)."""

    def __init__(self, model: DeploymentHandle[Any], options: dict[str, Any]) -> None:
        self.model, self.options = model, ClusterOptions.model_validate(options)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return ingress_app(self.options, self.model)


def build_app(args: dict[str, Any]) -> Application:
    """The application ``serve run`` and the Serve config start: ``args`` are :class:`ClusterOptions` fields."""
    options = ClusterOptions.model_validate(args)
    if options.max_model_replicas is None:
        scaling: dict[str, Any] = {"num_replicas": options.model_replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.model_replicas,
                "max_replicas": options.max_model_replicas,
                "target_ongoing_requests": options.max_batch,
            }
        }
    model = (
        serve.deployment(ModelReplica)
        .options(
            name=MODEL_DEPLOYMENT,
            ray_actor_options={"num_cpus": options.model_num_cpus, "num_gpus": options.model_num_gpus},
            max_ongoing_requests=options.max_batch + options.max_queue,
            health_check_period_s=5,
            health_check_timeout_s=30,
            request_router_config=RequestRouterConfig(request_router_class=ImageAffinityRouter),
            **scaling,
        )
        .bind(options.model_dump(mode="json"))
    )
    ingress = serve.deployment(serve.ingress()(McpIngress)).options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=1024,
    )
    return ingress.bind(model, options.model_dump(mode="json"))
