"""What a cluster deployment is configured with: the arguments of ``serve run mcp_server.cluster.app:build_app`` or
the ``args`` of deploy/serve_config.yaml (no ray here, so tests and tools can read it without Ray)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mcp_server.settings import Settings


class ClusterOptions(BaseModel):
    """The model replicas, the ingress and the shared handle store.

    Replica counts, GPUs and autoscaling bounds can also be set per deployment in the Serve config (its
    ``deployments`` section wins over these).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "demo"
    device: str = "auto"
    dtype: str = "auto"
    cpu_threads: int | None = Field(1, ge=1, description="torch threads per model replica on the CPU")
    max_batch: int = Field(16, ge=1)
    max_queue: int = Field(64, ge=1)
    fixed_new_tokens: int | None = Field(None, ge=1, description="benchmarks only (see --fixed-new-tokens)")
    model_replicas: int = Field(1, ge=1, description="model replicas at start (and the autoscaling minimum)")
    max_model_replicas: int | None = Field(None, ge=1, description="autoscaling maximum (None: a fixed count)")
    model_num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica: 1 on a GPU node")
    model_num_cpus: float = Field(1.0, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    affinity: bool = Field(True, description="route calls about an image to the replica that has it encoded")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "nextchat"
    redis_timeout_s: float = Field(2.0, gt=0, description="socket timeouts: an unreachable Redis fails a call in this")
    tokens_env: str = Field(
        "NEXTCHAT_TOKENS", description="environment variable with 'principal=token,...' (unset: no tokens asked)"
    )
    allow_dirs: tuple[Path, ...] = ()
    allow_urls: bool = True
    handle_ttl_s: float = Field(3600.0, gt=0)
    request_timeout_s: float = Field(120.0, gt=0)

    def settings(self) -> Settings:
        """The server settings every replica builds its part from."""
        return Settings(
            model=self.model, device=self.device, dtype=self.dtype, cpu_threads=self.cpu_threads,
            max_batch=self.max_batch, max_queue=self.max_queue, fixed_new_tokens=self.fixed_new_tokens,
            allow_dirs=self.allow_dirs, allow_urls=self.allow_urls, handle_ttl_s=self.handle_ttl_s,
            request_timeout_s=self.request_timeout_s,
        )  # fmt: skip
