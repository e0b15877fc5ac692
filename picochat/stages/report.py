"""`picochat report`: write the run's report card, <run>/report.md with plots in <run>/report/.

Built only from the JSON / JSONL files the other stages write (picochat/report.py lists them); running it again
regenerates everything, so it can be run at any point of a run.
"""

from __future__ import annotations

import argparse

from picochat.common import PicochatError, add_run_arguments, log, resolve_run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument(
        "--hourly-cost",
        type=_price,
        metavar="USD",
        help="cost of the training machine per hour, for the cost estimate "
        "(default: a rough GPU price list; none on CPU)",
    )


def _price(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a price in USD per hour, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative price in USD per hour, got {value!r}")
    return number


def run(args: argparse.Namespace) -> int:
    from picochat.report import build_report

    run_dir = resolve_run_dir(args.run, args.run_dir)
    if not run_dir.is_dir():
        raise PicochatError(f"run folder {run_dir} does not exist (give --run NAME or --run-dir PATH)")
    path = build_report(run_dir, hourly_cost_usd=args.hourly_cost)
    log(f"wrote {path}")
    print(path)
    return 0
