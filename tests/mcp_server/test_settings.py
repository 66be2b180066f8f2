"""Settings: defaults, flags, environment twins and their order, and bad values refused in one line."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mcp_server.cli import call_main
from mcp_server.settings import OptionParser, Settings, options


REPO = Path(__file__).resolve().parents[2]

DEFAULTS: dict[str, Any] = {
    "model": "demo",
    "device": "auto",
    "dtype": "auto",
    "quantize": "none",
    "allow_dirs": (),
    "allow_urls": True,
    "allow_http": False,
    "transport": "stdio",
    "host": "127.0.0.1",
    "port": 8000,
    "token": None,
    "max_queue": 64,
    "max_batch": 16,
    "max_wait_ms": 5.0,
    "request_timeout_s": 60.0,
    "ready_wait_s": 20.0,
    "handle_ttl_s": 3600.0,
    "decode_workers": 2,
    "decode_memory_mib": 2048,
    "drain_timeout_s": 30.0,
    "fixed_new_tokens": None,
    "cpu_threads": None,
    "cuda_graphs": True,
}

# Every flag, its environment twin (as README.md documents them), a value for both, and the setting it gives.
OPTIONS: list[tuple[str, str, str | None, str, Any]] = [
    ("--model", "NEXTCHAT_MODEL", "/srv/ckpt", "model", "/srv/ckpt"),
    ("--device", "NEXTCHAT_DEVICE", "cuda:1", "device", "cuda:1"),
    ("--dtype", "NEXTCHAT_DTYPE", "float32", "dtype", "float32"),
    ("--quantize", "NEXTCHAT_QUANTIZE", "int8", "quantize", "int8"),
    ("--allow-dir", "NEXTCHAT_ALLOW_DIRS", "/pictures", "allow_dirs", (Path("/pictures"),)),
    ("--no-urls", "NEXTCHAT_NO_URLS", None, "allow_urls", False),
    ("--allow-http", "NEXTCHAT_ALLOW_HTTP", None, "allow_http", True),
    ("--transport", "NEXTCHAT_TRANSPORT", "streamable-http", "transport", "streamable-http"),
    ("--host", "NEXTCHAT_HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("--port", "NEXTCHAT_PORT", "9000", "port", 9000),
    ("--token", "NEXTCHAT_TOKEN", "s3cret", "token", "s3cret"),
    ("--max-queue", "NEXTCHAT_MAX_QUEUE", "8", "max_queue", 8),
    ("--max-batch", "NEXTCHAT_MAX_BATCH", "4", "max_batch", 4),
    ("--max-wait-ms", "NEXTCHAT_MAX_WAIT_MS", "0", "max_wait_ms", 0.0),
    ("--timeout", "NEXTCHAT_TIMEOUT", "2.5", "request_timeout_s", 2.5),
    ("--ready-wait", "NEXTCHAT_READY_WAIT", "7", "ready_wait_s", 7.0),
    ("--decode-workers", "NEXTCHAT_DECODE_WORKERS", "3", "decode_workers", 3),
    ("--decode-memory-mib", "NEXTCHAT_DECODE_MEMORY_MIB", "512", "decode_memory_mib", 512),
    ("--drain-timeout", "NEXTCHAT_DRAIN_TIMEOUT", "3", "drain_timeout_s", 3.0),
    ("--fixed-new-tokens", "NEXTCHAT_FIXED_NEW_TOKENS", "12", "fixed_new_tokens", 12),
    ("--cpu-threads", "NEXTCHAT_CPU_THREADS", "2", "cpu_threads", 2),
    ("--no-cuda-graphs", "NEXTCHAT_NO_CUDA_GRAPHS", None, "cuda_graphs", False),
]
SERVE_ONLY = {
    "--transport",
    "--host",
    "--port",
    "--token",
    "--max-queue",
    "--max-batch",
    "--max-wait-ms",
    "--drain-timeout",
    "--ready-wait",
}


def load(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    """The serve settings from ``argv`` and ``environ`` alone."""
    return OptionParser("serve").parse_settings(argv, environ or {})[0]


def refusal(capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str]) -> str:
    """The one stderr line with which the serve options refuse ``argv`` under ``environ`` (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        load(argv, environ)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


def clean_environment(**variables: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NEXTCHAT_")}, **variables}


def test_defaults_are_the_documented_ones() -> None:
    assert Settings().model_dump() == DEFAULTS
    assert load([]) == Settings()


def test_the_table_has_every_documented_flag_and_twin_and_nothing_else() -> None:
    from mcp_server.settings import env_twin

    table = {option.flag: env_twin(option) for option in options("serve").values()}
    assert table == {flag: twin for flag, twin, *_ in OPTIONS}
    assert "handle_ttl_s" not in options("serve")  # set in code only


def test_each_flag_gives_its_setting() -> None:
    for flag, _, value, field, expected in OPTIONS:
        settings = load([flag] if value is None else [flag, value])
        assert getattr(settings, field) == expected, flag
        assert settings.model_dump(exclude={field}) == {k: v for k, v in DEFAULTS.items() if k != field}, flag


def test_each_environment_twin_gives_its_setting() -> None:
    for _, twin, value, field, expected in OPTIONS:
        settings = load([], {twin: value or "1"})
        assert getattr(settings, field) == expected, twin
        assert settings.model_dump(exclude={field}) == {k: v for k, v in DEFAULTS.items() if k != field}, twin


def test_a_flag_beats_its_twin_and_the_twin_beats_the_default() -> None:
    environ = {"NEXTCHAT_PORT": "9000", "NEXTCHAT_MAX_BATCH": "4", "NEXTCHAT_ALLOW_DIRS": "/from-env"}
    settings = load(["--port", "9001", "--allow-dir", "/a", "--allow-dir", "/b"], environ)
    assert settings.port == 9001
    assert settings.max_batch == 4
    assert settings.allow_dirs == (Path("/a"), Path("/b"))  # the flags replace the twin's list
    assert not load(["--no-urls"], {"NEXTCHAT_NO_URLS": "0"}).allow_urls


def test_boolean_twins_say_whether_their_flag_is_on() -> None:
    for word in ("1", "true", "YES", " on "):
        assert not load([], {"NEXTCHAT_NO_URLS": word}).allow_urls, word
        assert load([], {"NEXTCHAT_ALLOW_HTTP": word}).allow_http, word
    for word in ("0", "false", "No", "off", ""):
        assert load([], {"NEXTCHAT_NO_URLS": word}).allow_urls, word
        assert not load([], {"NEXTCHAT_ALLOW_HTTP": word}).allow_http, word


def test_allow_dirs_twin_is_split_on_the_path_separator() -> None:
    listed = os.pathsep.join(["/a", "", "~/b", "/c d"])
    assert load([], {"NEXTCHAT_ALLOW_DIRS": listed}).allow_dirs == (Path("/a"), Path("~/b").expanduser(), Path("/c d"))
    assert load([], {"NEXTCHAT_ALLOW_DIRS": ""}).allow_dirs == ()


def test_empty_twins_count_as_unset() -> None:
    assert load([], {"NEXTCHAT_PORT": "", "NEXTCHAT_MODEL": ""}) == Settings()


def test_settings_built_in_code_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTCHAT_PORT", "abc")
    monkeypatch.setenv("NEXTCHAT_MODEL", "/elsewhere")
    monkeypatch.setenv("NEXTCHAT_NO_URLS", "1")
    assert Settings().model_dump() == DEFAULTS
    assert Settings(model="demo", max_batch=2, request_timeout_s=5).request_timeout_s == 5.0
    with pytest.raises(ValidationError):
        Settings(max_batch=0)


def test_settings_are_immutable_and_hide_the_token() -> None:
    settings = Settings(token="s3cret")
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    assert "s3cret" not in repr(settings)


def test_the_command_line_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXTCHAT_MAX_QUEUE", "3")
    settings, rest = OptionParser("serve").parse_settings([])
    assert settings.max_queue == 3
    assert vars(rest) == {}


@pytest.mark.parametrize(
    ("argv", "environ", "words"),
    [
        ([], {"NEXTCHAT_PORT": "abc"}, ["NEXTCHAT_PORT='abc'", "--port", "from 1 to 65535", "unset NEXTCHAT_PORT"]),
        (["--help"], {"NEXTCHAT_PORT": "abc"}, ["NEXTCHAT_PORT='abc'", "--port"]),  # broken even for --help
        (["--port", "80"], {"NEXTCHAT_PORT": "abc"}, ["NEXTCHAT_PORT='abc'", "--port"]),
        ([], {"NEXTCHAT_NO_URLS": "maybe"}, ["NEXTCHAT_NO_URLS='maybe'", "--no-urls", "true", "off"]),
        ([], {"NEXTCHAT_MAX_QUEUE": "0"}, ["NEXTCHAT_MAX_QUEUE='0'", "--max-queue", "at least 1"]),
        (["--max-batch", "0"], {}, ["--max-batch '0'", "NEXTCHAT_MAX_BATCH", "at least 1"]),
        (["--timeout", "-1"], {}, ["--timeout '-1'", "NEXTCHAT_TIMEOUT", "above 0"]),
        (["--transport", "tcp"], {}, ["--transport 'tcp'", "NEXTCHAT_TRANSPORT", "stdio or streamable-http"]),
        (["--cpu-threads", "0"], {}, ["--cpu-threads '0'", "NEXTCHAT_CPU_THREADS", "at least 1"]),
        (["--port", "65536"], {}, ["--port '65536'", "NEXTCHAT_PORT", "from 1 to 65535"]),
        (["--max-wait-ms", "nan"], {}, ["--max-wait-ms 'nan'", "NEXTCHAT_MAX_WAIT_MS"]),
        (["--ready-wait", "inf"], {}, ["--ready-wait 'inf'", "NEXTCHAT_READY_WAIT"]),  # it would overflow int()
        (["--max-batch", "2.5"], {"NEXTCHAT_MAX_BATCH": "4"}, ["--max-batch '2.5'", "a whole number"]),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option_and_exit_status_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str], words: list[str]
) -> None:
    line = refusal(capsys, argv, environ)
    assert line.startswith("nextchat-mcp: ")
    for word in words:
        assert word in line


def test_call_takes_only_its_options_and_reads_only_their_twins(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        call_main(["status", "{}", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for flag, *_ in OPTIONS:
        assert (flag in text) is (flag not in SERVE_ONLY), flag
    assert "tool" in text and "arguments" in text
    # A serve option's twin does not concern `call`, broken or not.
    assert OptionParser("call").parse_settings([], {"NEXTCHAT_PORT": "abc"})[0].port == 8000
    parser = OptionParser("call")
    parser.add_argument("tool")
    settings, rest = parser.parse_settings(["status", "--timeout", "9"], {"NEXTCHAT_TIMEOUT": "1"})
    assert settings.request_timeout_s == 9.0
    assert vars(rest) == {"tool": "status"}


def run_cli(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=clean_environment(**environ), capture_output=True, text=True, timeout=60
    )


def test_a_broken_environment_stops_even_help_without_a_traceback() -> None:
    done = run_cli("-m", "mcp_server", "--help", NEXTCHAT_PORT="abc")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "nextchat-mcp: NEXTCHAT_PORT='abc' is not a valid --port: give a whole number from 1 to 65535 "
        "(or unset NEXTCHAT_PORT)\n"
    )
    done = run_cli("-m", "mcp_server", "call", "status", "--cpu-threads", "0")
    assert done.returncode == 2
    assert done.stderr.startswith("nextchat-mcp call: --cpu-threads '0' is not valid")
    assert done.stderr.count("\n") == 1


def test_help_lists_the_serve_options_mentions_call_and_does_not_import_torch() -> None:
    script = (
        "import sys\n"
        "from mcp_server.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    done = run_cli("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("torch not imported")
    assert "nextchat-mcp call" in done.stdout
    for flag, twin, *_ in OPTIONS:
        assert flag in done.stdout and twin in done.stdout, flag
