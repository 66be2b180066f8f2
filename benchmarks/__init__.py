"""Benchmarks of the MCP server against the naive path (``python -m benchmarks.bench``)."""
