"""docker/triton-entrypoint.sh and docker/triton_prepare.py, run here with stand-ins.

``ivvae export`` and ``tritonserver`` are replaced by small scripts on PATH that record how
they were called, so the export-if-stale logic, the prepared model repository and the final
``exec tritonserver`` are tested without a container, a GPU or a model.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import text_format
from tests.devtools.test_repository import CPU_CONFIG
from tritonclient.grpc import model_config_pb2

from ivvae.core.artifacts import EXPORT_VERSION

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "triton-entrypoint.sh"

FAKE_IVVAE = """#!/usr/bin/env bash
set -euo pipefail
echo "$*" >> "$FAKE_LOG/ivvae.calls"
[[ "${FAKE_EXPORT_FAILS:-0}" == 1 ]] && { echo "export failed" >&2; exit 3; }
out="" format=""
while (($#)); do
  case "$1" in --out) out="$2"; shift 2 ;; --format) format="$2"; shift 2 ;; *) shift ;; esac
done
echo artifact > "$out/encoder.pt"
echo artifact > "$out/decoder.pt"
cat > "$out/export_manifest.json" <<EOF
{"format": "$format", "model": {"name": "fake", "z_dim": 4, "dim": 4, "scale_factor": 1.0,
 "shift_factor": 0.0, "weights_sha256": "$(printf 'a%.0s' {1..64})", "trained": true,
 "source": "/weights/ivvae.pth", "num_params": 10},
 "files": {"encoder": "encoder.pt", "decoder": "decoder.pt"}, "cache_slots": {},
 "ivvae_version": "0", "torch_version": "0", "export_version": @EXPORT_VERSION@,
 "precision": "float32"}
EOF
"""

FAKE_TRITONSERVER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG/tritonserver.args"
echo "$IVVAE_ARTIFACT_DIR" > "$FAKE_LOG/tritonserver.artifact_dir"
"""


def model_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@dataclass
class Stage:
    root: Path
    env: dict[str, str]

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def repository(self) -> Path:
        return self.root / "prepared"

    def run(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(ENTRYPOINT), *args],
            env={**self.env, **extra_env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def export_calls(self) -> list[str]:
        calls = self.log / "ivvae.calls"
        return calls.read_text().splitlines() if calls.exists() else []

    def fingerprint_dirs(self) -> list[Path]:
        return sorted(p for p in self.artifacts.iterdir() if not p.name.startswith("."))


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def stage(tmp_path: Path) -> Stage:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "ivvae", FAKE_IVVAE.replace("@EXPORT_VERSION@", str(EXPORT_VERSION)))
    _executable(bin_dir / "tritonserver", FAKE_TRITONSERVER)
    source = tmp_path / "model_repository"
    for name in ("ivvae_encoder", "ivvae_decoder"):
        (source / name / "1").mkdir(parents=True)
        (source / name / "config.pbtxt").write_text(CPU_CONFIG.format(name=name))
        (source / name / "1" / "model.py").write_text("# stand-in\n")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "ivvae.pth").write_bytes(b"weights v1")
    (tmp_path / "log").mkdir()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "PYTHON": sys.executable,
        "FAKE_LOG": str(tmp_path / "log"),
        "WEIGHTS_DIR": str(tmp_path / "weights"),
        "ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "MODEL_REPOSITORY_SRC": str(source),
        "MODEL_REPOSITORY": str(tmp_path / "prepared"),
    }
    return Stage(tmp_path, env)


def test_serve_exports_prepares_and_execs_tritonserver(stage: Stage) -> None:
    result = stage.run(
        "serve",
        "--log-verbose=1",
        PRECISION="bfloat16",
        INSTANCE_KIND="KIND_GPU",
        INSTANCE_COUNT="1",
        TRITONSERVER_ARGS="--exit-timeout-secs=60",
    )
    assert result.returncode == 0, result.stderr
    [artifact_dir] = stage.fingerprint_dirs()
    assert (artifact_dir / ".complete").is_file() and (artifact_dir / "encoder.pt").is_file()
    assert stage.export_calls() == [
        f"export --format torchscript --weights {stage.weights / 'ivvae.pth'} --out "
        + stage.export_calls()[0].rsplit(" ", 1)[-1]
    ]
    args = (stage.log / "tritonserver.args").read_text().splitlines()
    assert args[0] == f"--model-repository={stage.repository}"
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(args)
    assert args[-2:] == ["--exit-timeout-secs=60", "--log-verbose=1"]
    recorded = (stage.log / "tritonserver.artifact_dir").read_text().strip()
    assert recorded == str(artifact_dir)

    config = (stage.repository / "ivvae_encoder" / "config.pbtxt").read_text()
    assert f'string_value: "{artifact_dir}"' in config
    assert 'string_value: "torchscript"' in config and 'string_value: "onnx"' not in config
    assert 'string_value: "bfloat16"' in config
    assert "kind: KIND_GPU" in config and "count: 1" in config and "KIND_CPU" not in config
    assert 'string_value: "/somewhere/venv"' in config  # untouched parameters stay
    info = json.loads(model_config(config).parameters["MODEL_INFO"].string_value)
    assert info["name"] == "fake"  # from the export manifest: what the gateway reads
    assert (stage.repository / "ivvae_decoder" / "1" / "model.py").is_file()


def test_artifacts_are_reused_until_the_weights_change(stage: Stage) -> None:
    assert stage.run().returncode == 0
    assert stage.run().returncode == 0
    assert len(stage.export_calls()) == 1
    [old] = stage.fingerprint_dirs()
    (stage.weights / "ivvae.pth").write_bytes(b"weights v2")
    assert stage.run().returncode == 0
    assert len(stage.export_calls()) == 2
    [new] = stage.fingerprint_dirs()
    assert new != old and not old.exists()


def test_export_subcommand_exports_per_format_without_starting_the_server(
    stage: Stage,
) -> None:
    result = stage.run("export")
    assert result.returncode == 0, result.stderr
    assert stage.run("export", ARTIFACT_FORMAT="onnx").returncode == 0
    assert [call.split()[2] for call in stage.export_calls()] == ["torchscript", "onnx"]
    assert len(stage.fingerprint_dirs()) == 1  # the torchscript set was stale for onnx
    assert not (stage.log / "tritonserver.args").exists()


def test_failed_export_leaves_nothing_behind(stage: Stage) -> None:
    result = stage.run(FAKE_EXPORT_FAILS="1")
    assert result.returncode != 0
    assert "export failed" in result.stderr
    assert list(stage.artifacts.iterdir()) == []
    assert not (stage.log / "tritonserver.args").exists()


def test_named_weights_file_must_exist(stage: Stage) -> None:
    result = stage.run(WEIGHTS_FILE="other.safetensors")
    assert result.returncode == 64
    assert "WEIGHTS_FILE=other.safetensors" in result.stderr


def test_several_weights_files_need_weights_file(stage: Stage) -> None:
    (stage.weights / "second.safetensors").write_bytes(b"x")
    result = stage.run()
    assert result.returncode == 64
    assert "set WEIGHTS_FILE" in result.stderr
    assert stage.run(WEIGHTS_FILE="second.safetensors").returncode == 0


def test_pre_exported_artifacts_serve_without_weights(stage: Stage) -> None:
    assert stage.run("export").returncode == 0
    (stage.weights / "ivvae.pth").unlink()
    result = stage.run()
    assert result.returncode == 0, result.stderr
    assert "pre-exported" in result.stderr
    assert len(stage.export_calls()) == 1


def test_bad_precision_is_refused_before_triton_starts(stage: Stage) -> None:
    result = stage.run(PRECISION="fp8")
    assert result.returncode != 0
    assert "PRECISION must be one of" in result.stderr
    assert not (stage.log / "tritonserver.args").exists()


def test_other_commands_run_as_given(stage: Stage) -> None:
    result = stage.run("echo", "hello")
    assert result.returncode == 0 and result.stdout == "hello\n"


# -- triton_prepare.py on its own --------------------------------------------------------------


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("ARTIFACT_DIRR=/x", "unknown parameter"),
        ("ARTIFACT_FORMAT=savedmodel", "ARTIFACT_FORMAT must be one of"),
        ("SEQUENCE_TTL_S=-1", "positive number"),
        ("PRECISION", "is not KEY=VALUE"),
    ],
)
def test_parameter_values_are_checked(prepare: ModuleType, assignment: str, message: str) -> None:
    with pytest.raises(prepare.PrepareError, match=message):
        prepare._parse_assignments([assignment])


def test_fingerprint_follows_weights_bytes_and_format(prepare: ModuleType, tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"a")
    fingerprint: Callable[[Path, str], str] = prepare.fingerprint
    first = fingerprint(weights, "torchscript")
    assert len(first) == 16 and first == fingerprint(weights, "torchscript")
    assert first != fingerprint(weights, "onnx")
    weights.write_bytes(b"b")
    assert first != fingerprint(weights, "torchscript")
