"""What every front-end shares: flags generated from an options dataclass (``add_option_flags``), boolean
flag values, one-line argparse errors, and the error contract (``run_command``: one stderr line per
failure, control characters escaped, exit codes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
import typing
from typing import Any, Callable, Collection, Mapping, NoReturn, Optional, Sequence

from llm_merge import __version__
from llm_merge.errors import ConfigError, MergeError

_TRUE = {"true", "1", "yes", "y", "on"}


_FALSE = {"false", "0", "no", "n", "off"}


def json_value(text: str) -> Any:
    """A flag value given as JSON (``--slices``, ``--tensor_parameters``)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None


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


def add_option_flags(parser: argparse.ArgumentParser, options: type, names: Optional[Sequence[str]] = None, *,
                     defaults: Optional[Mapping[str, Any]] = None, aliases: Optional[Mapping[str, Sequence[str]]] = None,
                     required: Collection[str] = ()) -> None:
    """Add one flag ``--field`` per field of the options dataclass ``options`` (or per field in ``names``),
    its help and choices from the field's metadata (``help``, ``choices``), its default shown in the help.

    A bool field is ``--x``, ``--x true|false`` or ``--no_x``; a ``list[T]`` field takes one or more
    values; a bare ``dict`` or ``list`` field takes JSON; any other field converts with its type. A flag
    not given stores nothing, so the parsed namespace holds what the user set, plus ``defaults``: this
    front-end's own defaults, which replace the field's (in the help too). ``aliases`` are more flag
    names of a field; the fields in ``required`` must be given.
    """
    defaults = dict(defaults or {})
    aliases = aliases or {}
    hints = typing.get_type_hints(options)
    fields = {f.name: f for f in dataclasses.fields(options)}
    for name in fields if names is None else names:
        field = fields[name]
        default = defaults[name] if name in defaults else _field_default(field)
        flags = (f"--{name}", *aliases.get(name, ()))
        _add_flag(parser, flags, field, _unwrap_optional(hints[name]), _help(field, default), name in required)
    parser.set_defaults(**defaults)


def option_help(options: type, name: str) -> str:
    """The help ``add_option_flags`` gives field ``name`` of the options dataclass ``options``."""
    field = next(f for f in dataclasses.fields(options) if f.name == name)
    return _help(field, _field_default(field))


def _help(field: dataclasses.Field, default: Any) -> str:
    """A field's metadata help, its choices and its default (unless None: the text says what absence means)."""
    text = field.metadata["help"]
    if field.metadata.get("choices"):
        text += f"; one of: {', '.join(field.metadata['choices'])}"
    if default is not None:
        text += f" (default: {str(default).lower() if isinstance(default, bool) else default})"
    return text


def add_debug_and_version(parser: argparse.ArgumentParser) -> None:
    """``--debug`` (tracebacks; read by ``run_command``) and ``--version``."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"llm_merge {__version__}")


def options_from_flags(parser: argparse.ArgumentParser, config_class: type, argv: Optional[Sequence[str]]) -> Any:
    """``argv`` parsed by ``parser`` into an unresolved ``config_class`` (``--debug`` is ``run_command``'s, left out)."""
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)
    return config_class(**args)


def _field_default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]


def _unwrap_optional(hint: Any) -> Any:
    """``Optional[T]`` -> ``T``; any other hint unchanged."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _add_flag(parser: argparse.ArgumentParser, flags: Sequence[str], field: dataclasses.Field, kind: Any, help_text: str,
              required: bool) -> None:
    common = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text, "required": required}
    if kind is bool:
        parser.add_argument(*flags, nargs="?", const=True, type=parse_bool, metavar="true|false", **common)
        parser.add_argument(f"--no_{field.name}", dest=field.name, action="store_false", default=argparse.SUPPRESS,
                            help=f"same as --{field.name} false")
    elif kind in (dict, list):  # tensor_parameters, slices: JSON on the command line
        parser.add_argument(*flags, type=json_value, metavar="JSON", **common)
    elif typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        parser.add_argument(*flags, nargs="+", type=item, metavar=field.name.upper().removesuffix("_LIST"), **common)
    else:
        choices = field.metadata.get("choices")
        parser.add_argument(*flags, type=kind, choices=choices, metavar=None if choices else field.name.upper(), **common)


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


def one_blas_thread() -> None:
    """One OpenBLAS thread per process, unless the user chose otherwise or NumPy is already loaded.

    Worker processes are the parallelism; OpenBLAS threads beside them only compete for the same cores
    (an extraction's SVDs ran ~20x slower with 2 threads per process on a busy 2-core machine).
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def quiet_logging(quiet: bool) -> None:
    """``--quiet``: only warnings and errors."""
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)

