"""ivvae.devtools.repository: the one model-repository preparer (protobuf text format)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ivvae.core.artifacts import MANIFEST_NAME, ExportManifest, artifact_files
from ivvae.core.model_info import ModelInfo
from ivvae.devtools.repository import (
    EXECUTION_ENV_PATH,
    PrepareError,
    check_parameters,
    prepare_repository,
    rewrite_config,
)

TOY_REPOSITORY = Path(__file__).parent / "toy_repository"

CPU_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 8
sequence_batching {{
  max_sequence_idle_microseconds: 60000000
  oldest {{ max_candidate_sequences: 16 }}
}}
instance_group [ {{ count: 2, kind: KIND_CPU }} ]
parameters {{ key: "ARTIFACT_FORMAT" value: {{ string_value: "onnx" }} }}
parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "/somewhere/venv" }} }}
"""

NESTED = """\
name: "m"  # parameters { key: "X" } in a comment is not a field
backend: "python"
parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "/old/venv" } }
parameters: [
  { key: "KEEP" value { string_value: "} { # not a comment" } },
  < key: 'LOG' value: { string_value: "0" } >
]
optimization {
  execution_accelerators {
    cpu_execution_accelerator [ { name: "x" parameters { key: "LOG" value: "nested" } } ]
  }
}
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def model_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def string_parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_rewrite_replaces_top_level_parameters_only() -> None:
    config = model_config(rewrite_config(NESTED, {EXECUTION_ENV_PATH: "/new/venv", "LOG": "1"}))
    assert string_parameters(config) == {
        EXECUTION_ENV_PATH: "/new/venv", "KEEP": "} { # not a comment", "LOG": "1"}
    (accelerator,) = config.optimization.execution_accelerators.cpu_execution_accelerator
    assert dict(accelerator.parameters) == {"LOG": "nested"}
    assert config.instance_group[0].count == 1


def test_rewrite_round_trips_awkward_values() -> None:
    awkward = 'C:\\dir with "quotes"\nand a newline'
    text = rewrite_config('name: "m"\nbackend: "python"', {"PATH": awkward})
    assert string_parameters(model_config(text)) == {"PATH": awkward}
    assert model_config(text).name == "m"


def test_rewrite_keeps_the_config_and_replaces_what_it_is_told() -> None:
    text = CPU_CONFIG.format(name="ivvae_encoder")
    out = rewrite_config(text, {"SEQUENCE_TTL_S": "300"})
    assert 'key: "SEQUENCE_TTL_S"' in out and 'string_value: "300"' in out
    assert "kind: KIND_CPU" in out and "count: 2" in out  # instance group untouched
    assert "max_candidate_sequences: 16" in out
    only_kind = rewrite_config(text, {}, instance_kind="KIND_GPU")
    assert "kind: KIND_GPU" in only_kind and "count: 2" in only_kind


def test_rewrite_refuses_what_triton_would_refuse() -> None:
    with pytest.raises(PrepareError, match="cannot parse"):
        rewrite_config("instance_group [ { kind: KIND_TPU } ]", {})
    with pytest.raises(PrepareError, match="cannot parse"):
        rewrite_config('name: "m"\nparameters { key: "A"', {"B": "1"})


def test_sequence_ttl_also_sets_the_triton_idle_timeout() -> None:
    text = CPU_CONFIG.format(name="ivvae_encoder")
    config = model_config(rewrite_config(text, {"SEQUENCE_TTL_S": "2.5"}))
    assert config.parameters["SEQUENCE_TTL_S"].string_value == "2.5"
    assert config.sequence_batching.max_sequence_idle_microseconds == 2_500_000


@pytest.mark.parametrize(("values", "message"), [
    ({"ARTIFACT_FORMAT": "savedmodel"}, "ARTIFACT_FORMAT must be one of"),
    ({"PRECISION": "fp8"}, "PRECISION must be one of"),
    ({"SEQUENCE_TTL_S": "-1"}, "positive number"),
    ({"NUM_THREADS": "two"}, "positive number"),
])
def test_parameter_values_are_checked(values: dict[str, str], message: str) -> None:
    with pytest.raises(PrepareError, match=message):
        check_parameters(values)


def test_parameter_names_are_checked_when_asked() -> None:
    check_parameters({"LOG": "1"})
    with pytest.raises(PrepareError, match="unknown parameters"):
        check_parameters({"ARTIFACT_DIRR": "/x"}, known_names=True)
    check_parameters({"NUM_THREADS": "2", "MODEL_INFO": "{}"}, known_names=True)


def test_prepare_repository_writes_parameters_into_the_copy_only(tmp_path: Path) -> None:
    committed = {p: p.read_bytes() for p in TOY_REPOSITORY.rglob("config.pbtxt")}
    dst = prepare_repository(
        TOY_REPOSITORY, tmp_path / "repo",
        parameters={"*": {"A": "all", "B": "all"}, "sleeper": {"B": "sleeper"}},
    )
    assert {p: p.read_bytes() for p in TOY_REPOSITORY.rglob("config.pbtxt")} == committed
    for text in committed.values():
        assert EXECUTION_ENV_PATH.encode() not in text
        assert b'"/' not in text  # no absolute path is committed
    accumulator = model_config((dst / "accumulator" / "config.pbtxt").read_text())
    sleeper = model_config((dst / "sleeper" / "config.pbtxt").read_text())
    assert string_parameters(accumulator) == {EXECUTION_ENV_PATH: sys.prefix, "A": "all",
                                              "B": "all"}
    assert string_parameters(sleeper) == {EXECUTION_ENV_PATH: sys.prefix, "A": "all",
                                          "B": "sleeper"}
    assert (dst / "accumulator" / "1" / "model.py").is_file()
    assert not list(dst.rglob("__pycache__"))
    libpython = Path(sys.prefix) / "lib" / "libpython3.11.so.1.0"
    if sys.prefix != sys.base_prefix and sys.version_info[:2] == (3, 11):
        assert libpython.exists()
    # Preparing again replaces the earlier copy.
    prepare_repository(TOY_REPOSITORY, dst)
    assert "A" not in string_parameters(
        model_config((dst / "accumulator" / "config.pbtxt").read_text()))


def test_prepare_repository_refuses_mistakes(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="unknown models"):
        prepare_repository(TOY_REPOSITORY, tmp_path / "a", parameters={"acumulator": {"X": "1"}})
    with pytest.raises(PrepareError, match="not a virtual environment"):
        prepare_repository(TOY_REPOSITORY, tmp_path / "b", env_path=tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="not empty"):
        prepare_repository(TOY_REPOSITORY, foreign)
    assert (foreign / "precious.txt").exists()
    with pytest.raises(PrepareError, match=r"no \*/config\.pbtxt"):
        prepare_repository(tmp_path / "foreign", tmp_path / "out")


def test_model_info_comes_from_the_export_manifest(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "ivvae_encoder").mkdir(parents=True)
    (source / "ivvae_encoder" / "config.pbtxt").write_text(CPU_CONFIG.format(name="ivvae_encoder"))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    params = {"ARTIFACT_DIR": str(artifacts), "ARTIFACT_FORMAT": "onnx"}
    with pytest.raises(PrepareError, match="export with `ivvae export`"):
        prepare_repository(source, tmp_path / "out", parameters={"*": params}, env_path=None)
    info = ModelInfo(name="m", z_dim=4, dim=4, scale_factor=1.0, shift_factor=0.0,
                     weights_sha256="ab" * 32, trained=True, source="x", num_params=1)
    files = artifact_files("torchscript")
    for name in files.values():
        (artifacts / name).write_bytes(b"x")
    ExportManifest(format="torchscript", model=info.as_dict(), files=files, cache_slots={},
                   ivvae_version="0", torch_version="0").write(artifacts)
    assert (artifacts / MANIFEST_NAME).is_file()
    with pytest.raises(PrepareError, match="holds torchscript artifacts"):
        prepare_repository(source, tmp_path / "out", parameters={"*": params}, env_path=None)
    params["ARTIFACT_FORMAT"] = "torchscript"
    prepare_repository(source, tmp_path / "out", parameters={"*": params}, env_path=None)
    config = model_config((tmp_path / "out" / "ivvae_encoder" / "config.pbtxt").read_text())
    assert ModelInfo.from_json(config.parameters["MODEL_INFO"].string_value) == info
    assert config.parameters["EXECUTION_ENV_PATH"].string_value == "/somewhere/venv"
