"""The tools, one module each: a handler, its result model and its :class:`~mcp_server.tools.steps.ToolSpec`.

``mcp_server.server.TOOLS`` lists the specs the server registers; the steps they share are in ``steps.py``.
"""
