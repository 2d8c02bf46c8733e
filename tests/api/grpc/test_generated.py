"""The committed generated modules are exactly what scripts/gen_proto.py makes from
ivvae.proto now (edit the .proto, then run the script)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GEN = ROOT / "service" / "ivvae" / "api" / "grpc" / "gen"


def _gen_proto_module() -> object:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    gen_proto = _gen_proto_module()
    written = gen_proto.generate(tmp_path)  # type: ignore[attr-defined]
    names = sorted(p.name for p in written)
    committed = sorted(p.name for p in GEN.iterdir() if p.is_file())
    assert names == committed
    stale = [n for n in names if (tmp_path / n).read_bytes() != (GEN / n).read_bytes()]
    assert not stale, f"{stale} differ from ivvae.proto: run python scripts/gen_proto.py"


def test_generated_service_imports_inside_the_package() -> None:
    from ivvae.api.grpc.gen import ivvae_pb2, ivvae_pb2_grpc

    assert ivvae_pb2_grpc.ivvae__pb2 is ivvae_pb2
    assert ivvae_pb2.DESCRIPTOR.package == "ivvae.v1"
