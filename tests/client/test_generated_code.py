"""The committed protobuf modules must match what proto/ generates now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "client" / "banditd_client" / "v1"


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    assert written, "no .proto files found"
    for fresh in written:
        committed = COMMITTED / fresh.name
        assert committed.exists(), f"{committed} missing: run `make proto`"
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale: run `make proto`"
