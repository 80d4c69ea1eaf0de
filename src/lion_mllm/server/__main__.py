"""`python -m lion_mllm.server --model DIR ...`: the same as `lion serve`."""

import argparse
import sys

from . import add_serve_subcommand


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lion_mllm.server")
    sub = parser.add_subparsers(dest="command")
    add_serve_subcommand(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
