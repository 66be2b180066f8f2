"""Imports go one way: nextchat/ knows nothing of MCP or asyncio; the protocol layer loads torch only in the runner."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["mcp_server.server", "mcp_server.cli", "mcp_server.schemas", "mcp_server.executor"])
def test_the_protocol_layer_imports_without_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules, 'nextchat.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_model_package_knows_nothing_of_mcp_or_asyncio() -> None:
    for path in (ROOT / "nextchat").rglob("*.py"):
        assert not imported_modules(path) & {"mcp", "mcp_server", "asyncio", "anyio"}, path


def test_only_the_runner_imports_torch_or_nextchat_in_the_protocol_layer() -> None:
    for path in (ROOT / "mcp_server").glob("*.py"):
        heavy = imported_modules(path) & {"torch", "nextchat", "transformers"}
        assert not heavy or path.name == "runner.py", path
