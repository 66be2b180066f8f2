"""Server settings, declared once: each field of :class:`Settings` carries its flag, its help and where it applies.

Every option has an environment twin named after its flag (``--max-batch`` → ``NEXTCHAT_MAX_BATCH``); on the command
line, a flag beats its twin and the twin beats the default. Code that builds :class:`Settings` itself gets its
keywords over the defaults and never the environment, so tests and generated files do not depend on the shell.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, get_args, get_origin

from annotated_types import Ge, Gt, Le, MinLen
from pydantic import AfterValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


Command = Literal["serve", "call"]
SERVE: frozenset[Command] = frozenset({"serve"})
SERVE_AND_CALL: frozenset[Command] = frozenset({"serve", "call"})

# What a boolean twin may say; anything else is refused rather than read as "off".
SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class Option:
    """How a setting is given on the command line.

    Attributes:
        flag: The flag. A boolean setting's flag takes no value and turns the default around (``--no-urls`` sets
            ``allow_urls`` to False); a tuple's flag is repeatable.
        commands: The commands that take it.
        help: What it does, for ``--help``.
        metavar: The value's name in ``--help``; by default the flag's name in capitals.
        env: The environment twin's name after ``NEXTCHAT_``; by default the flag's name in capitals.
    """

    flag: str
    commands: frozenset[Command]
    help: str
    metavar: str | None = None
    env: str | None = None

    @property
    def name(self) -> str:
        """The flag in capitals, without dashes: ``MAX_BATCH`` for ``--max-batch``."""
        return self.flag.removeprefix("--").replace("-", "_").upper()


def _expand_user(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    return tuple(path.expanduser() for path in paths)


class Settings(BaseSettings):
    """Everything the server is configured with; immutable.

    A field without an :class:`Option` has no flag nor twin and is only set in code.
    """

    model_config = SettingsConfigDict(env_prefix="NEXTCHAT_", frozen=True, allow_inf_nan=False)

    model: Annotated[
        str,
        Option(
            "--model",
            SERVE_AND_CALL,
            "checkpoint directory, Hugging Face hub id, or 'demo' (the embedded shapes-world model)",
        ),
        Field(min_length=1),
    ] = "demo"
    device: Annotated[
        str,
        Option("--device", SERVE_AND_CALL, "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps"),
        Field(min_length=1),
    ] = "auto"
    dtype: Annotated[
        str,
        Option(
            "--dtype",
            SERVE_AND_CALL,
            "auto (bf16 on CUDA, fp16 on MPS; on a CPU bf16 for a 7B-sized LLM, fp32 for small models and, without "
            "bf16 instructions, for the vision tower, SAM and heads), float32, bfloat16, float16",
        ),
        Field(min_length=1),
    ] = "auto"
    quantize: Annotated[
        Literal["none", "int8", "nf4"],
        Option(
            "--quantize",
            SERVE_AND_CALL,
            "the language model's layer weights: none (16-bit), int8 (CPU or CUDA; half the bytes), nf4 (CUDA "
            "only, needs the quantize extra)",
        ),
    ] = "none"
    allow_dirs: Annotated[
        tuple[Path, ...],
        Option(
            "--allow-dir",
            SERVE_AND_CALL,
            "a directory whose images may be read; with none, no local file is readable",
            metavar="DIR",
            env="ALLOW_DIRS",
        ),
        AfterValidator(_expand_user),
    ] = ()
    allow_urls: Annotated[bool, Option("--no-urls", SERVE_AND_CALL, "never fetch https:// images")] = True
    allow_http: Annotated[bool, Option("--allow-http", SERVE_AND_CALL, "also fetch plain http:// images")] = False
    transport: Annotated[Literal["stdio", "streamable-http"], Option("--transport", SERVE, "how clients connect")] = (
        "stdio"
    )
    host: Annotated[str, Option("--host", SERVE, "HTTP bind address"), Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Option("--port", SERVE, "HTTP port"), Field(ge=1, le=65535)] = 8000
    token: Annotated[
        str | None,
        Option("--token", SERVE, "bearer token HTTP clients must send (required when --host is not loopback)"),
        Field(repr=False),
    ] = None
    max_queue: Annotated[
        int, Option("--max-queue", SERVE, "requests allowed to wait; more are refused with a retry hint"), Field(ge=1)
    ] = 64
    max_batch: Annotated[int, Option("--max-batch", SERVE, "requests decoded together"), Field(ge=1)] = 16
    max_wait_ms: Annotated[
        float, Option("--max-wait-ms", SERVE, "how long an idle model waits for more requests to batch"), Field(ge=0)
    ] = 5.0
    request_timeout_s: Annotated[
        float, Option("--timeout", SERVE_AND_CALL, "seconds a request may take before it is dropped"), Field(gt=0)
    ] = 60.0
    ready_wait_s: Annotated[
        float,
        Option(
            "--ready-wait",
            SERVE,
            "seconds a call made while the model loads waits (with progress) before 'warming up, retry'",
        ),
        Field(ge=0),
    ] = 20.0
    handle_ttl_s: Annotated[float, Field(gt=0)] = 3600.0
    decode_workers: Annotated[
        int,
        Option(
            "--decode-workers",
            SERVE_AND_CALL,
            "processes that decode images, each under CPU-time and memory limits and killed at the call's deadline",
            metavar="N",
        ),
        Field(ge=1, le=64),
    ] = 2
    decode_memory_mib: Annotated[
        int,
        Option(
            "--decode-memory-mib",
            SERVE_AND_CALL,
            "memory (MiB) one decode worker may map beyond its start-up size; an image needing more is refused",
            metavar="MIB",
        ),
        Field(ge=64),
    ] = 2048
    drain_timeout_s: Annotated[
        float,
        Option("--drain-timeout", SERVE, "on SIGTERM, seconds admitted requests get to finish before the server exits"),
        Field(gt=0),
    ] = 30.0
    fixed_new_tokens: Annotated[
        int | None,
        Option(
            "--fixed-new-tokens",
            SERVE_AND_CALL,
            "benchmarking only: every generated answer is exactly N tokens (end-of-answer is suppressed), so runs "
            "compare; answers are then cut or padded with whatever the model says next",
            metavar="N",
        ),
        Field(ge=1),
    ] = None
    cpu_threads: Annotated[
        int | None,
        Option(
            "--cpu-threads",
            SERVE_AND_CALL,
            "torch threads when the model runs on the CPU (default: the usable cores less one, which the protocol "
            "side needs: with every core in torch's pool, each decode step waits for a core the event loop holds)",
            metavar="N",
        ),
        Field(ge=1),
    ] = None
    cuda_graphs: Annotated[
        bool,
        Option(
            "--no-cuda-graphs",
            SERVE_AND_CALL,
            "on a GPU, run decode steps eagerly instead of replaying captured CUDA graphs (for debugging and "
            "comparison; graphs are faster)",
        ),
    ] = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keywords over defaults, nothing else: only :meth:`OptionParser.parse_settings` reads the environment."""
        return (init_settings,)


def options(command: Command) -> dict[str, Option]:
    """The options ``command`` takes, by field name, in declaration order."""
    found: dict[str, Option] = {}
    for name, field in Settings.model_fields.items():
        option = next((m for m in field.metadata if isinstance(m, Option)), None)
        if option is not None and command in option.commands:
            found[name] = option
    return found


def env_twin(option: Option) -> str:
    """The environment variable that stands in for ``option``'s flag."""
    return str(Settings.model_config.get("env_prefix", "")) + (option.env or option.name)


class UnreadableTwin(ValueError):
    """An environment twin whose text no value can come from (a boolean twin that is not a yes or a no)."""

    def __init__(self, field_name: str, text: str) -> None:
        super().__init__(f"{field_name}: {text!r}")
        self.field_name = field_name
        self.text = text


class EnvironmentTwins(PydanticBaseSettingsSource):
    """Field values from the environment twins of one command's options, read as the flags would give them.

    An empty twin counts as unset. A boolean twin says whether its flag is on (1, true, yes, on; or 0, false, no,
    off); a tuple's twin lists its items separated by :data:`os.pathsep`. Other twins pass as text, for the
    settings to validate.
    """

    def __init__(self, settings_cls: type[BaseSettings], command: Command, environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.options = options(command)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The twin's value for the field, or None when it is unset (or the field takes no option here).

        Raises:
            UnreadableTwin: A boolean twin that is neither a yes nor a no.
        """
        option = self.options.get(field_name)
        text = self.environ.get(env_twin(option), "") if option else ""
        if not text:
            return None, field_name, False
        if field.annotation is bool:
            switch = SWITCH_WORDS.get(text.strip().lower())
            if switch is None:
                raise UnreadableTwin(field_name, text)
            return (not field.default) if switch else field.default, field_name, False
        if get_origin(field.annotation) is tuple:
            return [item for item in text.split(os.pathsep) if item], field_name, False
        return text, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


class OptionParser(argparse.ArgumentParser):
    """An argument parser whose options are the settings ``command`` takes; add the command's own arguments to it."""

    def __init__(self, command: Command = "serve", **kwargs: Any) -> None:
        kwargs.setdefault("prog", "nextchat-mcp" if command == "serve" else f"nextchat-mcp {command}")
        super().__init__(**kwargs)
        self.command: Command = command
        for name, option in options(command).items():
            field = Settings.model_fields[name]
            # Options given no flag stay out of the namespace, so that their twins or defaults show through.
            common: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(option, field)}
            if field.annotation is bool:
                self.add_argument(option.flag, action="store_const", const=not field.default, **common)
            else:
                choices = _choices(field)
                metavar = "{" + ",".join(choices) + "}" if choices else option.metavar or option.name
                action = "append" if get_origin(field.annotation) is tuple else "store"
                self.add_argument(option.flag, action=action, metavar=metavar, **common)

    def parse_settings(
        self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> tuple[Settings, argparse.Namespace]:
        """Settings from flags over environment twins over defaults, and the command's other arguments.

        The environment is checked before the flags are parsed, so that even ``--help`` says when it is broken.

        Args:
            argv: The command's arguments (default: ``sys.argv[1:]``).
            environ: Where the twins are read (default: :data:`os.environ`).

        Returns:
            The settings, and a namespace with the arguments that are not settings.

        Raises:
            SystemExit: 2, after one line on stderr that names the option with the bad value and says what to give.
        """
        environ = os.environ if environ is None else environ
        try:
            from_environment = EnvironmentTwins(Settings, self.command, environ)()
            Settings(**from_environment)
        except UnreadableTwin as error:
            self._refuse_twin(error.field_name, environ)
        except ValidationError as error:
            self._refuse_twin(str(error.errors()[0]["loc"][0]), environ)
        args = self.parse_args(argv)
        from_flags = {name: getattr(args, name) for name in options(self.command) if hasattr(args, name)}
        for name in from_flags:
            delattr(args, name)
        try:
            settings = Settings(**(from_environment | from_flags))
        except ValidationError as error:
            problem = error.errors()[0]
            self._refuse_flag(str(problem["loc"][0]), problem["input"])
        return settings, args

    def _refuse_twin(self, field_name: str, environ: Mapping[str, str]) -> NoReturn:
        option = options(self.command)[field_name]
        name = env_twin(option)
        # The text as set, quoted, so that stray spaces and quotes show.
        self.exit(
            2,
            f"{self.prog}: {name}={environ[name]!r} is not a valid {option.flag}: "
            f"give {_expected(Settings.model_fields[field_name])} (or unset {name})\n",
        )

    def _refuse_flag(self, field_name: str, given: object) -> NoReturn:
        option = options(self.command)[field_name]
        self.exit(
            2,
            f"{self.prog}: {option.flag} {given!r} is not valid: "
            f"give {_expected(Settings.model_fields[field_name])} (on the command line or in {env_twin(option)})\n",
        )


def _choices(field: FieldInfo) -> tuple[str, ...]:
    return (
        tuple(str(choice) for choice in get_args(field.annotation)) if get_origin(field.annotation) is Literal else ()
    )


def _help(option: Option, field: FieldInfo) -> str:
    """The option's help, with its twin and default."""
    name = env_twin(option)
    if field.annotation is bool:
        where = f"{name}=1"
    elif get_origin(field.annotation) is tuple:
        where = f"repeatable; {name}, {os.pathsep!r}-separated"
    elif field.default is None:
        where = name
    else:
        default = f"{field.default:g}" if isinstance(field.default, float) else field.default
        where = f"{name}; default {default}"
    return f"{option.help} [{where}]".replace("%", "%%")  # argparse formats help with %


def _expected(field: FieldInfo) -> str:
    """What a field accepts, in words, for an error message."""
    if field.annotation is bool:
        return "one of " + ", ".join(SWITCH_WORDS)
    if choices := _choices(field):
        return " or ".join(choices)
    constraints = field.metadata
    if any(isinstance(c, MinLen) for c in constraints):
        return "a value that is not empty"
    types = (field.annotation, *get_args(field.annotation))
    kind = "a whole number" if int in types else "a number" if float in types else "a value"
    ge = next((c.ge for c in constraints if isinstance(c, Ge)), None)
    gt = next((c.gt for c in constraints if isinstance(c, Gt)), None)
    le = next((c.le for c in constraints if isinstance(c, Le)), None)
    if ge is not None and le is not None:
        return f"{kind} from {ge} to {le}"
    if ge is not None:
        return f"{kind} of at least {ge}"
    if gt is not None:
        return f"{kind} above {gt}"
    return kind
