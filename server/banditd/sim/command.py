"""`banditd simulate WORLD...`: play worlds in process (default) or against a running server
(`--target`), print a table per world and write PNG plots and the table to a report folder."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from banditd.sim import contextual, inprocess, report
from banditd.sim.metrics import Summary, Trace, summarise
from banditd.sim.worlds import WORLDS, Contender, World

E2E_HORIZON_WARNING = 100_000
# Every world by name: the context-free ones, then the contextual ones (their own player).
NAMES = [*WORLDS, *contextual.WORLDS]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("simulate", help="does it learn? play simulated worlds, print regret tables and plots")
    p.add_argument("worlds", nargs="+", choices=[*NAMES, "all"], metavar="WORLD",
                   help=f"one or more of {', '.join(NAMES)}, or all")
    p.add_argument("--seeds", type=int, default=0, help="runs per contender (default: the world's own)")
    p.add_argument("--horizon", type=int, default=0, help="rounds per run (default: the world's own)")
    p.add_argument("--report-dir", type=Path, default=Path("reports/simulate"), help="where tables and PNGs go")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--target", default="", help="host:port of a running server: run end to end through it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = NAMES if "all" in args.worlds else args.worlds
    for name in names:
        if name in contextual.WORLDS:
            run_contextual(args, name)
            continue
        world = WORLDS[name]()
        if args.horizon:
            world = dataclasses.replace(world, horizon=args.horizon)
        seeds = args.seeds or world.seeds
        started = time.perf_counter()
        target = args.target
        if target and world.in_process_only:
            print(f"note: {world.name} is played in process only (not through {target})", file=sys.stderr)
            target = ""
        summaries = simulate(world, seeds, target)
        text = report.table(world, summaries, seeds)
        mode = f"end to end through {target}" if target else "in process"
        text += f"\n({mode}, {time.perf_counter() - started:.1f} s)"
        _write(args, world.name, text, partial(report.plots, world, summaries, args.report_dir))
    return 0


def _write(args: argparse.Namespace, name: str, text: str, plots: Callable[[], list[Path]]) -> None:
    """Prints a world's table, writes it under the report dir, then its plots (unless off)."""
    print(text + "\n", flush=True)
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / f"{name}.txt").write_text(text + "\n")
    if not args.no_plots:
        for path in plots():
            print(f"  wrote {path}")
        print()


def run_contextual(args: argparse.Namespace, name: str) -> None:
    world = contextual.WORLDS[name]()
    if args.horizon:
        world = dataclasses.replace(world, horizon=args.horizon)
    seeds = args.seeds or world.seeds
    if args.target:
        print(f"note: {world.name} is played in process only (not through {args.target})", file=sys.stderr)
    started = time.perf_counter()
    summaries = contextual.simulate(world, seeds)
    text = contextual.table(world, summaries, seeds) + f"\n(in process, {time.perf_counter() - started:.1f} s)"
    _write(args, world.name, text, partial(contextual.plots, world, summaries, args.report_dir))


def simulate(world: World, seeds: int, target: str = "") -> list[Summary]:
    """Every contender of `world` over `seeds` runs, in process or through `target`."""
    if not target:
        return [summarise(world, c.name, [inprocess.run(world, c, s) for s in range(seeds)]) for c in world.contenders]
    from banditd.sim import e2e
    from banditd_client import Client

    if world.horizon > E2E_HORIZON_WARNING:
        print(f"note: {world.horizon:,} rounds end to end take a while; --horizon shortens a run", file=sys.stderr)
    with Client(target) as client:
        return [_e2e(client, world, c, seeds, e2e.run) for c in world.contenders]


def _e2e(client, world: World, contender: Contender, seeds: int, play) -> Summary:  # type: ignore[no-untyped-def]
    traces: list[Trace] = [play(client, world, contender, s) for s in range(seeds)]
    return summarise(world, contender.name, traces)
