"""The ``ivvae`` command line. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _verify_golden(args: argparse.Namespace) -> int:
    from .model.golden import verify_golden

    ok = True
    for path in args.files:
        try:
            result = verify_golden(path)
        except (OSError, ValueError) as exc:
            print(json.dumps({"file": path, "error": str(exc), "passed": False}))
            ok = False
            continue
        print(json.dumps(result.as_dict()))
        ok = ok and result.passed
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivvae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify-golden", help="check the model against golden vector files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(handler=_verify_golden)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
