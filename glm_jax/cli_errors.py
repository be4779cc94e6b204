"""One way for every command-line entry point to report a user's mistake: one line on
stderr naming the flag, file or config field and the fix, exit code 2, no traceback.

`UserError` marks the exceptions that are the user's mistake (a bad flag value, a missing
file, a checkpoint that does not fit); the library raises them like any other exception,
and only the CLI wrappers here turn them into that one line. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

USAGE_EXIT_CODE = 2  # as argparse and most Unix tools: the command was used wrongly

T = TypeVar("T")


class UserError(Exception):
    """Base of the errors that are the user's to fix; the message is the whole report."""


class ConfigError(UserError, ValueError):
    """A config field or flag value that cannot work; the message names it."""


class InputPathError(UserError, FileNotFoundError):
    """A file or folder the user named is missing or is not what it should be."""


def print_error(prog: str, message: object) -> int:
    """Print `prog: error: message` to stderr; returns USAGE_EXIT_CODE. Messages are one
    line, except the converter's lists of bad tensors (a summary line, then one each)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return USAGE_EXIT_CODE


def fail(prog: str, message: object) -> NoReturn:
    """`print_error`, then exit with USAGE_EXIT_CODE."""
    sys.exit(print_error(prog, message))


def report_user_errors(prog: str, fn: Callable[[], T],
                       also: tuple[type[BaseException], ...] = ()) -> T:
    """Run `fn`; a UserError (or one of `also`, e.g. FileExistsError) ends the process
    through `fail`."""
    try:
        return fn()
    except (UserError, *also) as e:
        fail(prog, e)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its error as one line (argparse prints the whole usage first) that
    points at --help; exit code 2 as argparse's."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")
