"""Command line: `banditd serve | diagnose | simulate | export | evaluate`."""

from __future__ import annotations

import argparse
import sys

from banditd import config, diagnose, evaluate, export, logs
from banditd.sim import command as simulate


def _serve(ns: argparse.Namespace) -> int:
    from banditd.app import serve

    cfg = config.from_args(ns)
    logs.setup(cfg.log_level)
    serve(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="banditd", description="multi-armed bandit decision server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    config.add_serve_args(serve)
    serve.set_defaults(func=_serve)
    diagnose.add_parser(sub)
    simulate.add_parser(sub)
    export.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
