"""The committed generated modules must match what scripts/gen_protos.py produces now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "fedloom" / "protos" / "fedloom"


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    fresh_root = tmp_path / "fedloom" / "protos" / "fedloom"
    fresh = {p.relative_to(fresh_root): p.read_bytes() for p in fresh_root.rglob("*") if p.is_file()}
    committed = {p.relative_to(GENERATED): p.read_bytes() for p in GENERATED.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert {str(p) for p in fresh} >= {"protos/fleet_pb2.py", "protos/fleet_pb2.pyi", "protos/fleet_pb2_grpc.py"}
    assert sorted(map(str, committed)) == sorted(map(str, fresh)), "generated files added or removed: rerun the script"
    stale = [str(p) for p in fresh if committed[p] != fresh[p]]
    assert not stale, f"stale generated modules {stale}: run `python scripts/gen_protos.py`"


def test_generated_modules_import_under_the_package_path() -> None:
    from fedloom.protos.fedloom.protos import fleet_pb2, fleet_pb2_grpc

    assert fleet_pb2.DESCRIPTOR.package == "fedloom.protos"
    assert hasattr(fleet_pb2_grpc, "FleetStub")
