"""Imports go one way: nextchat/ knows nothing of MCP or asyncio; the protocol layer loads torch only in the runner."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module",
    ["mcp_server.server", "mcp_server.cli", "mcp_server.schemas", "mcp_server.schema_files", "mcp_server.executor"],
)
def test_the_protocol_layer_imports_without_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules, 'nextchat.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


# The model package's modules that import no torch: the protocol layer may use their words and records.
TORCH_FREE = {
    "nextchat",
    "nextchat.tasks",
    "nextchat.prompting",
    "nextchat.tokenization",
    "nextchat.scopes",
    "nextchat.resizing",
}


def imported_modules(path: Path, full: bool = False) -> set[str]:
    """The modules a file imports (absolute imports), as top-level packages or, with ``full``, dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names if node.module == "nextchat")
    return names if full else {name.split(".")[0] for name in names}


def test_the_model_package_knows_nothing_of_mcp_or_asyncio() -> None:
    for path in (ROOT / "nextchat").rglob("*.py"):
        assert not imported_modules(path) & {"mcp", "mcp_server", "asyncio", "anyio"}, path


def test_only_the_runner_imports_torch_or_the_model_in_the_protocol_layer() -> None:
    for path in (ROOT / "mcp_server").rglob("*.py"):
        heavy = {name for name in imported_modules(path, full=True) if name.split(".")[0] in ("torch", "transformers")}
        model = {name for name in imported_modules(path, full=True) if name.split(".")[0] == "nextchat"} - TORCH_FREE
        assert not (heavy | model) or path.name == "runner.py", (path, heavy | model)


def test_the_model_modules_the_protocol_layer_uses_import_no_torch() -> None:
    for module in sorted(TORCH_FREE):
        code = f"import sys, {module}; print('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        assert out.stdout.split() == ["False"], module
