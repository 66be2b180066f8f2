"""The single-machine server needs neither Ray nor Redis: only the cluster modules import them."""

from __future__ import annotations

import subprocess
import sys


def test_the_server_imports_neither_ray_nor_redis() -> None:
    code = (
        "import sys, mcp_server.cli, mcp_server.server, mcp_server.stores, mcp_server.state;"
        "import mcp_server.cluster, mcp_server.cluster.options, mcp_server.cluster.auth;"
        "print(sorted(m for m in ('ray', 'redis') if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"
