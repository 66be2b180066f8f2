"""``tools_schema/``: each tool's name, title, description, annotations, input and output schema, one file a tool.

``python -m mcp_server.schema_files --write`` regenerates the files from what the server publishes (``tools/list``);
``--check`` exits 1 when the committed files drift.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from mcp_server.server import create_server
from mcp_server.settings import Settings


DEFAULT_DIR = Path(__file__).resolve().parent.parent / "tools_schema"


def published_tools() -> dict[str, dict[str, Any]]:
    """Each tool as ``tools/list`` gives it, by name (a server with default settings; the model is not loaded)."""

    async def listing() -> dict[str, dict[str, Any]]:
        tools = await create_server(Settings()).list_tools()
        return {t.name: t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools}

    return anyio.run(listing)


def expected_files() -> dict[str, str]:
    """File name → text, as ``--write`` writes them."""
    return {
        f"{name}.json": json.dumps(tool, indent=2, sort_keys=True) + "\n" for name, tool in published_tools().items()
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m mcp_server.schema_files --write | --check [--dir DIR]``."""
    parser = argparse.ArgumentParser(description="Write or check tools_schema/<tool>.json")
    parser.add_argument("--write", action="store_true", help="regenerate the files")
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs from the server")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    expected = expected_files()
    if args.write:
        args.dir.mkdir(exist_ok=True)
        for stale in {p.name for p in args.dir.glob("*.json")} - set(expected):
            (args.dir / stale).unlink()
        for name, text in expected.items():
            (args.dir / name).write_text(text)
        print(f"wrote {len(expected)} schemas to {args.dir}")
        return
    actual = {p.name: p.read_text() for p in args.dir.glob("*.json")} if args.dir.is_dir() else {}
    drifted = sorted(n for n in set(expected) | set(actual) if expected.get(n) != actual.get(n))
    if drifted:
        print(f"tools_schema/ is out of date ({', '.join(drifted)}); run: python -m mcp_server.schema_files --write")
        sys.exit(1)
    print("tools_schema/ matches the server")


if __name__ == "__main__":
    main()
