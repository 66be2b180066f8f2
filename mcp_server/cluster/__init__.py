"""The server on Ray Serve: stateless ingress replicas in front of model replicas (one per GPU), handles in Redis.

- :mod:`~mcp_server.cluster.options`: what a deployment is configured with (``serve run`` arguments, the YAML's
  ``args``);
- :mod:`~mcp_server.cluster.routing`: image affinity, a Ray Serve request router ranking replicas by rendezvous hashing
  of the image's hash;
- :mod:`~mcp_server.cluster.model`: the model deployment (an executor and its engine; continuous batching inside);
- :mod:`~mcp_server.cluster.remote`: the ingress side of it, an executor whose jobs run on model replicas;
- :mod:`~mcp_server.cluster.auth`: bearer tokens, each naming the principal that owns the handles it makes;
- :mod:`~mcp_server.cluster.app`: the ingress deployment (the MCP streamable-HTTP app, stateless) and the builder.

Only this package and :mod:`mcp_server.redis_store` import ray and redis: the single-machine server needs neither.
"""
