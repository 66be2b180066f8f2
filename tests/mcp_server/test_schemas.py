import json
from pathlib import Path

from mcp_server.schema_files import published_tools


SCHEMAS = Path(__file__).resolve().parents[2] / "tools_schema"


def test_committed_tool_schemas_match_what_the_server_publishes() -> None:
    published = published_tools()
    committed = {p.stem: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json")}
    assert committed.keys() == published.keys(), "run: python -m mcp_server.schema_files --write"
    for name, tool in published.items():
        assert committed[name] == tool, (
            f"tools_schema/{name}.json is stale; run: python -m mcp_server.schema_files --write"
        )
        assert tool["inputSchema"]["properties"]["image"]["type"] == "string" if name != "status" else True
        assert "outputSchema" in tool
