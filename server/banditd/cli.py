"""Command line: `banditd serve | keys | diagnose | model | simulate | export | evaluate`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import lmdb

from banditd import config, diagnose, evaluate, export, logs
from banditd.sim import command as simulate
from banditd.store import SchemaError, Store


def _serve(ns: argparse.Namespace) -> int:
    from banditd.app import serve

    cfg = config.from_args(ns)
    logs.setup(cfg.log_level)
    try:
        serve(cfg)
    except (lmdb.Error, SchemaError) as exc:  # pgkv's errors are lmdb.Error too
        raise SystemExit(f"banditd serve: cannot open the store: {exc}") from None
    return 0


def _keys_store(ns: argparse.Namespace, write: bool, create: bool = False) -> Store:
    try:
        if ns.store:  # PostgreSQL: the nodes' shared database
            return Store(ns.store, readonly=not write)
        if write:
            if not create and not (Path(ns.data_dir) / "data.mdb").exists():
                raise FileNotFoundError(f"no banditd store at {ns.data_dir} (data.mdb is missing)")
            store = Store(ns.data_dir)
            store.adopt_map_size()  # a running server may have grown the map
            return store
        return Store.open_readonly(ns.data_dir)
    except (FileNotFoundError, SchemaError) as exc:
        raise SystemExit(f"banditd keys: {exc}") from None


def _when(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _keys_create(ns: argparse.Namespace) -> int:
    from banditd.auth import key_status, new_key

    try:
        key, rec = new_key(ns.scope, prefix=ns.prefix, name=ns.name, expires_in_days=ns.expires_in_days)
    except ValueError as exc:
        raise SystemExit(f"banditd keys create: {exc}") from None
    store = _keys_store(ns, write=True, create=True)
    try:
        first = not any(r.revoked_ms is None for r in store.api_keys().values())
        store.add_api_key(rec)
    finally:
        store.close()
    print(key)  # the only time the key is shown
    print(
        f"created key {rec.key_id} (scopes {','.join(rec.scopes)}, prefix {rec.prefix or '-'}, "
        f"expires {_when(rec.expires_ms)}, {key_status(rec, rec.created_ms)}); it is shown once, above: store it now",
        file=sys.stderr,
    )
    if first:
        print(
            f"auth is now ON for {ns.data_dir}: servers on it refuse calls without a valid key within ~1 s",
            file=sys.stderr,
        )
    return 0


def _keys_list(ns: argparse.Namespace) -> int:
    from banditd.auth import key_status

    store = _keys_store(ns, write=False)
    try:
        keys = sorted(store.api_keys().values(), key=lambda r: r.created_ms)
    finally:
        store.close()
    now = int(time.time() * 1000)
    rows = [("id", "name", "scopes", "prefix", "created", "expires", "status")]
    rows += [
        (r.key_id, r.name or "-", ",".join(r.scopes), r.prefix or "-", _when(r.created_ms), _when(r.expires_ms),
         key_status(r, now) + (f" {_when(r.revoked_ms)}" if r.revoked_ms is not None else ""))
        for r in keys
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not any(r.revoked_ms is None for r in keys):
        print("no unrevoked key: auth is OFF (every caller may call every RPC)", file=sys.stderr)
    return 0


def _keys_revoke(ns: argparse.Namespace) -> int:
    store = _keys_store(ns, write=True)
    try:
        rec = store.revoke_api_key(ns.key_id, int(time.time() * 1000))
        left = sum(r.revoked_ms is None for r in store.api_keys().values())
    finally:
        store.close()
    if rec is None:
        print(f"banditd keys revoke: no key {ns.key_id!r} (see `banditd keys list`)", file=sys.stderr)
        return 1
    print(f"revoked key {rec.key_id} at {_when(rec.revoked_ms)}; servers refuse it within ~1 s", file=sys.stderr)
    if not left:
        print(
            "WARNING: no unrevoked key is left, so auth is now OFF: servers on this data dir accept every "
            "call without a key. Create a key to turn it back on.",
            file=sys.stderr,
        )
    return 0


def _add_keys_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser(
        "keys",
        help="create, list and revoke API keys (works while a server runs)",
        description="API keys of a data dir. Auth is on while at least one key is not revoked; running "
        "servers pick changes up within about 1 s.",
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    data_dir = os.environ.get("BANDITD_DATA_DIR") or config.ServerConfig().data_dir

    def with_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--data-dir", default=data_dir, help="the server's LMDB dir (BANDITD_DATA_DIR)")
        p.add_argument(
            "--store", default=os.environ.get("BANDITD_STORE", ""),
            help="the nodes' postgresql:// URL instead of an LMDB dir (BANDITD_STORE)",
        )
        return p

    create = with_dir(ksub.add_parser("create", help="create a key and print it (once)"))
    create.add_argument(
        "--scope", action="append", required=True, choices=("decide", "read", "admin"),
        help="decide: Decide and rewards; read: Get*/List*; admin: Create/UpdateExperiment and all of "
        "read and decide. Repeat for several.",
    )  # fmt: skip
    create.add_argument("--prefix", default="", help="only experiments whose id starts with this")
    create.add_argument("--expires-in-days", type=float, default=None, help="refused after this many days")
    create.add_argument("--name", default="", help="a label for `keys list`")
    create.set_defaults(func=_keys_create)
    with_dir(ksub.add_parser("list", help="list keys (never the keys themselves)")).set_defaults(func=_keys_list)
    revoke = with_dir(ksub.add_parser("revoke", help="revoke a key by its id"))
    revoke.add_argument("key_id", help="the id `keys list` shows (bd_<id>_...)")
    revoke.set_defaults(func=_keys_revoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="banditd", description="multi-armed bandit decision server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    config.add_serve_args(serve)
    serve.set_defaults(func=_serve)
    _add_keys_parser(sub)
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
