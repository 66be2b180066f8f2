"""What text goes back to callers: model text made safe to show, and argument errors as one sentence.

Model text comes from untrusted pixels, so it is stripped of control, zero-width, bidi and tag characters and capped
before it reaches a result; errors name the argument to change and how, never a stack trace or the rejected value.
"""

from __future__ import annotations

import re

from pydantic import ValidationError


# C0/C1 controls (ANSI escapes start with ESC), soft hyphen, zero-width and joiner characters, bidi embeddings,
# overrides and isolates (they reorder what a human reviewer sees), invisible operators, the BOM, and Unicode tag
# characters (which spell out ASCII invisibly and are a known channel for hidden instructions). Tabs and newlines stay.
_HIDDEN = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff"
    "\ufff9-\ufffb\U000e0000-\U000e007f]"
)
MAX_TEXT = 2000
MAX_ARGUMENT_PROBLEMS = 4


def clean_text(text: str) -> str:
    """Model text made safe to show: hidden and control characters removed, length capped at :data:`MAX_TEXT`."""
    return _HIDDEN.sub("", text)[:MAX_TEXT]


def argument_problems(error: ValidationError) -> str:
    """A pydantic validation error as one sentence naming each bad argument and what it should be.

    Pydantic's own text spans several lines, quotes the rejected value and links to its website; the caller needs
    none of that, only which argument to change and how.
    """
    problems: list[str] = []
    for detail in error.errors()[:MAX_ARGUMENT_PROBLEMS]:
        where = ".".join(str(part) for part in detail["loc"]) or "arguments"
        message = detail["msg"].removeprefix("Value error, ")  # a validator's own sentence, without pydantic's tag
        problems.append(f"{clean_text(where)[:40]}: {message[:120].rstrip('.').lower()}")
    more = error.error_count() - len(problems)
    suffix = f" (and {more} more)" if more > 0 else ""
    return "invalid arguments: " + "; ".join(problems) + suffix + "; check them against the tool's input schema"
