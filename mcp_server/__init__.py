"""nextchat-mcp: an MCP server that gives agents NExT-Chat's grounding (boxes, masks, grounded answers)."""

__version__ = "0.1.0"
