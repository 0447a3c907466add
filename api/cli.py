"""The `pokeserve` command line."""

from __future__ import annotations

import argparse
import sys

from engine.default_model import FetchError, fetch_default_model


def _fetch_model(args: argparse.Namespace) -> int:
    try:
        path = fetch_default_model(log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except FetchError as exc:
        print(f"pokeserve fetch-model: {exc}", file=sys.stderr)
        return 1
    print(path)  # the last line of output, for scripts
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pokeserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-model", help="make the embedded default model available "
                                "and print its directory")
    fetch.set_defaults(func=_fetch_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
