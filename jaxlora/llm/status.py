"""The exit status of `jaxlora synth` and `jaxlora judge`: whether everything asked for was made.

Both write what they produced and their report whatever happened; the status then tells a
script the truth: 0 when every requested item was produced (or the shortfall is within
`--allow-short FRACTION` of what was requested), 3 ("incomplete") otherwise, with one line on
stderr. Bad input and an unreachable LLM are errors (2) before anything is sent or written.
"""

from __future__ import annotations

import argparse
import sys

EXIT_INCOMPLETE = 3

EPILOG = (
    "exit status: 0 everything requested was produced (or the shortfall is within "
    "--allow-short); 2 bad input or an unreachable LLM (nothing sent or written); "
    "3 incomplete: some requested items were not produced -- the files and the report hold "
    "what was"
)


def add_allow_short(p: argparse.ArgumentParser, what: str) -> None:
    """The `--allow-short FRACTION` flag (default 0: any shortfall exits 3)."""
    p.add_argument(
        "--allow-short",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help=f"exit 0 although up to this fraction of the requested {what} is missing "
        "(default 0: any shortfall exits 3)",
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def exit_status(command: str, short: int, requested: int, allow: float) -> int:
    """EXIT_INCOMPLETE, with one line on stderr, when more than `allow` of `requested` is short."""
    if short <= allow * requested:
        return 0
    print(
        f"jaxlora {command}: incomplete: {short} of {requested} requested items were not "
        f"produced (--allow-short {allow:g}); see the report",
        file=sys.stderr,
    )
    return EXIT_INCOMPLETE
