"""What every front-end shares: boolean flag values, one-line argparse errors, and the error contract
(``run_command``: one stderr line per failure, control characters escaped, exit codes)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

from llm_merge.errors import ConfigError, MergeError

_TRUE = {"true", "1", "yes", "y", "on"}


_FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(text: str) -> bool:
    """PaddleNLP-style boolean flag value: true/false, yes/no, 1/0."""
    lowered = str(text).lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigError (one line, exit 2) instead of usage text and SystemExit."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def run_command(argv: Optional[Sequence[str]], command: Callable[[Optional[Sequence[str]]], Any]) -> int:
    """Run ``command(argv)`` with the CLI's logging and error contract; returns the exit code.

    Every failure is one ``llm_merge: error:`` line, control characters escaped, with the
    traceback only under ``--debug``: MergeError exits with its code (2 config, 1 runtime),
    OSError (disk full, permissions) and any other exception with 1, Ctrl-C with 130.
    """
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    _log_escaped()
    try:
        command(argv)
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        code, message = _failure(exc)
        if debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
    print(f"llm_merge: error: {escape_controls(message)}", file=sys.stderr)
    return code


def _failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) of an exception that ended a command."""
    if isinstance(exc, MergeError):
        return exc.exit_code, str(exc)
    if isinstance(exc, OSError):  # the environment failed (disk full, permissions), not the code
        where = f"{exc.filename}: " if exc.filename else ""
        return 1, f"{where}{exc.strerror or exc}; no output was written"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted; no output was written"
    if isinstance(exc, RecursionError):
        return 1, "input nested too deeply; no output was written"
    if isinstance(exc, MemoryError):
        return 1, "out of memory; no output was written"
    # a bug: still one line, the traceback with --debug
    return 1, f"internal error {type(exc).__name__}: {exc}; no output was written (--debug shows the traceback)"


_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}


def escape_controls(text: str) -> str:
    """``text`` with control characters (escape sequences, carriage returns, newlines) shown as ``\\xNN``,
    so a tensor or file name cannot rewrite the terminal or forge a second message line."""
    return text.translate(_CONTROLS)


class _EscapingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


def _log_escaped() -> None:
    """Log lines as ``llm_merge: message`` on stderr, control characters escaped."""
    logging.basicConfig(level=logging.INFO, format="llm_merge: %(message)s")
    for handler in logging.getLogger().handlers:
        if not isinstance(handler.formatter, _EscapingFormatter):
            handler.setFormatter(_EscapingFormatter("llm_merge: %(message)s"))


def quiet_logging(quiet: bool) -> None:
    """``--quiet``: only warnings and errors."""
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)

