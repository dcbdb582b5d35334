"""The committed message code and gRPC stubs must be what `make proto` generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(REPO)) for p in (REPO / "proto").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos],
        cwd=REPO, check=True,
    )
    # gRPC stubs for the containerd services we call (not for descriptor.proto: no service)
    services = [p for p in protos if "/containerd/" in p and not p.endswith("descriptor.proto")]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto",
         f"--grpc_python_out={tmp_path}", *services],
        cwd=REPO, check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert any(p.name.endswith("_pb2_grpc.py") for p in generated), "no gRPC stubs"
    assert generated, "protoc generated nothing"
    stale = [str(rel) for rel in generated if (tmp_path / rel).read_bytes()
             != (REPO / rel).read_bytes()]
    assert not stale, f"run `make proto`: stale generated files {stale}"
