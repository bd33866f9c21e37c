"""Command-line plumbing shared by `python -m conformance` and its subcommands: a parser whose errors are one line,
and argument types that validate a value at its flag (argparse then names the flag in the error).

Every number a flag takes is finite and in a stated range, so that no value can make a command run forever, overflow
a timer or start a thousand processes: the bounds below are the ones the launcher enforces too."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn

MAX_SECONDS = 7 * 24 * 3600.0
"""The longest timeout or time budget any flag or spawn() accepts: a week. A larger one cannot mean "end a hang" and
overflows the timers it is handed to (timedelta, threading's waits)."""
MAX_CPU_RANKS = 64
"""The most gloo ranks spawn() starts on one CPU machine: each is a process with torch loaded (hundreds of MB)."""
MAX_WORLD_SIZE = 1 << 20
"""The most ranks any flag names (torchrun's WORLD_SIZE across nodes); on one machine the caps above and the GPU count
apply."""
MAX_THREADS = 1024
"""The most intra-op threads --threads sets."""
MAX_JOBS = 64
"""The most parallel jobs (copies of the repository, each running the suite) a command starts."""
MAX_INT = (1 << 31) - 1
"""The largest count a plain positive-integer flag accepts (threads, layers, a table's rows, ...)."""
MAX_NUMBER = 1e12
"""The largest plain positive number a flag accepts (GB, GB/s, TFLOP/s, factors)."""
MAX_FILE_BYTES = 256 << 20
"""The largest input file (a report.json) a command reads."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose error is one line on stderr, `prog: error: message`, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def _positive(convert, high: float, what: str):
    """An argparse type: convert(text), finite and in (0, high]; else one line naming what is allowed."""

    bound = f"{high:g}" if isinstance(high, float) else str(high)

    def parse_value(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} at most {bound}, got {text!r}") from None
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(f"must be {what} at most {bound}, got {text}")
        return value

    return parse_value


def positive_integer(high: int, what: str = "a positive integer"):
    """An argparse type: an integer in [1, high], written as one ('1e3' and '2.0' are refused, not rounded)."""
    return _positive(int, high, what)


positive_int = positive_integer(MAX_INT)
"""An integer in [1, 2**31 - 1]."""

world_size = positive_integer(MAX_WORLD_SIZE)
"""Ranks: an integer in [1, 2**20]; the command checks the machine's own cap (CPU ranks, GPUs) once the device is
known."""


def positive_number(high: float, what: str = "a positive number"):
    """An argparse type: a finite number in (0, high]."""
    return _positive(float, high, what)


positive_float = positive_number(MAX_NUMBER)
"""A finite number in (0, 1e12]."""

seconds = positive_number(MAX_SECONDS, "a positive number of seconds")
"""A timeout or time budget: a finite number of seconds in (0, one week]."""


def in_range(low: float, high: float):
    """An argparse type: a number in [low, high)."""

    def parse_number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in [{low:g}, {high:g}), got {text!r}") from None
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}), got {text}")
        return value

    return parse_number


fraction = in_range(0, 1)
"""A number in [0, 1)."""


def names(text: str) -> list[str]:
    """Comma-separated names, at least one ("," alone is an error, not "everything")."""
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    if not chosen:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return chosen


def writable_dir(text: str) -> Path:
    """A folder that exists or can be created, and can be written to (created here, before any work)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot create folder {text!r}: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {text!r} is not writable")
    return path


def output_dir(text: str) -> Path:
    """A folder that exists and is writable, or that could be created (its nearest existing ancestor is a writable
    folder); unlike writable_dir, nothing is created, for commands that may still stop before any output."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    path = Path(text)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create folder {text!r}: {str(probe)!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {str(probe)!r} is not writable")
    return path


def writable_file(text: str) -> Path:
    """A file path whose folder exists or can be created and is writable; '-' stands for stdout."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    path = Path(text)
    if text == "-":
        return path
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    writable_dir(str(path.parent))
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"file {text!r} is not writable")
    return path


def read_input(text: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the input file `text`: it must exist and be a regular file (not a FIFO, which would block, nor
    a device such as /dev/zero, which never ends) of at most `limit` bytes. An ArgumentTypeError says which."""
    try:
        info = os.stat(text)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular file")
    if info.st_size > limit:
        raise argparse.ArgumentTypeError(f"{text!r} has {info.st_size} bytes, more than the {limit} allowed")
    try:
        fd = os.open(text, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise argparse.ArgumentTypeError(f"{text!r} has more than the {limit} bytes allowed")
    return data


def json_file(text: str) -> Any:
    """An argparse type: the parsed JSON of the regular file `text` (see read_input)."""
    data = read_input(text)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({type(error).__name__}: {error})") from None


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """parse_args, with --help and errors returned as an exit status instead of raised (for `main() -> int`)."""
    try:
        return parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
