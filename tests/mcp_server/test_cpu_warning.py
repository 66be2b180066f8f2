"""The server says at load when it is asked to run a 7B-sized language model on the CPU."""

import logging

import pytest

from mcp_server import runner


def test_a_7b_sized_llm_on_the_cpu_is_warned_about(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mcp_server.runner"):
        runner.NextChatRunner.load("demo", device="cpu")
    assert not [r for r in caplog.records if "GPU or Apple silicon" in r.getMessage()]
    monkeypatch.setattr(runner, "llm_parameter_count", lambda config: 6_738_456_576)
    with caplog.at_level(logging.WARNING, logger="mcp_server.runner"):
        runner.NextChatRunner.load("demo", device="cpu")
    [warning] = [r for r in caplog.records if "GPU or Apple silicon" in r.getMessage()]
    assert "6.7 B-parameter language model on the CPU" in warning.getMessage()
