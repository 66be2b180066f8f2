"""Tool arguments that must be spelt right: unknown keys are refused by name, with the closest valid one.

The SDK builds each tool's argument model from the handler's signature and ignores keys it does not know, so a
misspelt optional argument (``grounded`` for ``ground``) silently falls back to its default. :func:`strict_tool`
rebuilds a registered tool's argument model with ``extra="forbid"`` (the published ``inputSchema`` then says
``additionalProperties: false``), and :func:`unknown_arguments` turns the resulting errors into one sentence.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from mcp.server.mcpserver.tools.base import Tool
from pydantic import ConfigDict, ValidationError

from mcp_server.text import clean_text


MAX_KEY_SHOWN = 40  # an unknown key is caller text: shown cleaned and capped


def strict_tool(tool: Tool) -> Tool:
    """``tool`` with an argument model that refuses unknown keys, and the input schema that says so."""
    loose = tool.fn_metadata.arg_model
    strict = type(
        loose.__name__,
        (loose,),
        {
            "model_config": ConfigDict(extra="forbid", arbitrary_types_allowed=True),
            "__module__": loose.__module__,
            "__doc__": loose.__doc__,
        },
    )
    metadata = tool.fn_metadata.model_copy(update={"arg_model": strict})
    return tool.model_copy(update={"fn_metadata": metadata, "parameters": strict.model_json_schema(by_alias=True)})


def argument_names(tool: Tool) -> tuple[str, ...]:
    """The argument names a tool's input schema publishes."""
    properties: dict[str, Any] = tool.parameters.get("properties", {})
    return tuple(properties)


def unknown_arguments(error: ValidationError, valid: Sequence[str]) -> str | None:
    """One sentence naming each unknown key in ``error`` and the closest valid name, or ``None`` when no key was
    unknown (the other problems are then reported as usual)."""
    unknown = [str(d["loc"][0]) for d in error.errors() if d["type"] == "extra_forbidden" and d["loc"]]
    if not unknown:
        return None
    parts: list[str] = []
    for key in unknown[:4]:
        shown = clean_text(key)[:MAX_KEY_SHOWN]
        close = difflib.get_close_matches(key.strip().lower(), list(valid), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        parts.append(f"unknown argument {shown!r}{hint}")
    accepted = ", ".join(valid) if valid else "none"
    return "; ".join(parts) + f" (this tool takes: {accepted})"
