"""Regenerate the committed protobuf and gRPC modules from ``protos/``.

    python scripts/gen_protos.py            # writes fedloom/protos/fedloom/protos/*_pb2*.py(i)
    python scripts/gen_protos.py --out DIR  # writes the same tree under DIR (used by the staleness test)

The sources live in ``protos/fedloom/protos/``. They are compiled under the
virtual include path ``fedloom/protos`` (``-Ifedloom/protos=protos``), so the
generated modules land in ``fedloom/protos/fedloom/protos/`` and import one
another as ``fedloom.protos.fedloom.protos.<name>_pb2`` without any rewriting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "protos"
PACKAGE = "fedloom/protos"  # where, under the output root, the proto tree is placed
INIT = '"""Generated protobuf modules; regenerate with scripts/gen_protos.py."""\n'


def generate(out: Path) -> list[Path]:
    """Compile every .proto under protos/ into ``out``; returns the files written."""
    from grpc_tools import protoc

    protos = sorted(p.relative_to(SOURCES).as_posix() for p in SOURCES.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {SOURCES}")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpc_tools
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE}={SOURCES}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(f"{PACKAGE}/{p}" for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in (out / PACKAGE).rglob("*") if p.suffix in (".py", ".pyi"))
    # Packages between fedloom/protos/ and the generated modules need an __init__.py.
    for directory in {p.parent for p in written}:
        while directory != out / PACKAGE:
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text(INIT, encoding="utf-8")
            directory = directory.parent
    return sorted(p for p in (out / PACKAGE).rglob("*") if p.suffix in (".py", ".pyi"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
