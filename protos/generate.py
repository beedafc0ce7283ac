"""Regenerates the Python stubs next to the .proto files: `python -m protos.generate`.

`--check` exits non-zero when the committed stubs differ from what the .proto files produce.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "tandem" / "v1"


def _run_protoc(out_dir: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.glob("*.proto"))
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(out_dir: Path) -> dict[str, str]:
    gen = out_dir / "protos" / "tandem" / "v1"
    return {p.name: p.read_text() for p in sorted(gen.glob("*_pb2*.py*"))}


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        _run_protoc(Path(tmp))
        fresh = generated_files(Path(tmp))
    if "--check" in argv:
        committed = {p.name: p.read_text() for p in sorted(PROTO_DIR.glob("*_pb2*.py*"))}
        if committed != fresh:
            stale = sorted(set(committed) ^ set(fresh) | {n for n in fresh if committed.get(n) != fresh[n]})
            print(f"stale stubs: {stale}; run `python -m protos.generate`", file=sys.stderr)
            return 1
        return 0
    for name, text in fresh.items():
        (PROTO_DIR / name).write_text(text)
    print(f"wrote {len(fresh)} files to {PROTO_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
