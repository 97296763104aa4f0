"""Dataset commands: prepare (its flags come from PrepareOptions) and sample-data."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.commands import Command, quiet_libraries
from common.configtree import add_flags, from_args
from data_tools.prepare import PrepareOptions


def _add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a folder, a .zip, or a datasets folder (save_to_disk)")
    p.add_argument(
        "--out",
        required=True,
        help="new folder for the prepared dataset (the source is never changed)",
    )
    add_flags(p, PrepareOptions)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def prepare(args: argparse.Namespace) -> int:
    from data_tools.prepare import prepare as run_prepare

    opts = from_args(PrepareOptions, args)
    quiet_libraries()
    report = run_prepare(args.src, args.out, opts, show_progress=not args.no_progress)
    s = report["summary"]
    print(
        f"{s['kept']} of {s['files']} images prepared in {args.out} ({s['errors']} errors, {s['warnings']} warnings, "
        f"{s['infos']} notes); open {Path(args.out) / 'report.html'}\n"
        f"train on it with: data.path={args.out}"
        + (f" data.trigger={opts.trigger}" if opts.trigger else "")
    )
    # the images with errors were left out: the folder trains, but not on everything the user gave
    return 1 if s["errors"] else 0


def _add_sample_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="new folder for the images and captions")
    p.add_argument("--count", type=int, default=12, help="number of images")
    p.add_argument("--trigger", default="zxq", help="the brand's trigger word in every caption")


def sample_data(args: argparse.Namespace) -> int:
    from data_tools.sample_data import write_sample_data

    path = write_sample_data(args.dir, count=args.count, trigger=args.trigger)
    print(f"{args.count} captioned images written to {path}")
    return 0


COMMANDS = {
    "sample-data": Command(_add_sample_data_arguments, sample_data),
    "prepare": Command(_add_prepare_arguments, prepare),
}
