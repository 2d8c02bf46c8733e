"""ivvae.config.Settings refuses, at start-up, values that would silently do the wrong thing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ivvae.config import Settings


@pytest.mark.parametrize("keys", [",", " , ", "   ", ",,,"])
def test_a_key_list_of_only_separators_is_a_configuration_error(keys: str) -> None:
    with pytest.raises(ValidationError, match="no key"):
        Settings(api_keys=keys)


def test_empty_key_list_disables_auth_and_keys_are_trimmed() -> None:
    assert Settings(api_keys="").api_key_set == frozenset()
    assert Settings(api_keys=" k1 , ,k2 ").api_key_set == {"k1", "k2"}


@pytest.mark.parametrize("name", ["modèle", "a\r\nb", "x" * 65, "a b"])
def test_model_names_must_be_header_safe(name: str) -> None:
    with pytest.raises(ValidationError, match="model name"):
        Settings(model_name=name)
    with pytest.raises(ValidationError, match="model name"):
        Settings(extra_weights=f"{name}=/w.pth")


def test_extra_weights_are_parsed_at_construction() -> None:
    assert Settings(extra_weights="a=/x.pth, b.2=/y.pth").extra_weight_paths.keys() == {"a", "b.2"}
    with pytest.raises(ValidationError, match="NAME=PATH"):
        Settings(extra_weights="just-a-path.pth")


@pytest.mark.parametrize("window", [1, 65534, 2**31])
def test_grpc_stream_window_is_off_or_usable(window: int) -> None:
    with pytest.raises(ValidationError, match=r"65535|2147483647"):
        Settings(grpc_stream_window_bytes=window)
    assert Settings(grpc_stream_window_bytes=0).grpc_stream_window_bytes == 0
    assert Settings(grpc_stream_window_bytes=65535).grpc_stream_window_bytes == 65535


@pytest.mark.parametrize(("field", "value", "message"), [
    ("log_level", "verbose", "'verbose' is not a log level"),
    ("cache_ttl_s", 10**20, "less than or equal to"),  # Redis refused every write
    ("grpc_max_message_bytes", 2**32, "less than or equal to"),  # an OverflowError in grpc
    ("host", "", "at least 1 character"),  # a failed bind after the model loaded
    ("redis_url", "redis://cache:6379/latents", "the database is a number"),  # db 0 used
    ("redis_url", "http://cache:6379/0", "redis://, rediss:// or unix://"),
    # redis-py would answer text: every read of a binary entry failed, readiness said ok
    ("redis_url", "redis://cache:6379/0?decode_responses=true", "remove decode_responses"),
    ("extra_weights", "alt=/a.pth,alt=/b.pth", "names 'alt' twice"),
])
def test_values_that_would_fail_late_or_be_ignored_are_refused(
        field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_log_level_aliases_and_case() -> None:
    assert Settings(log_level="WARN").log_level == "warning"
    assert Settings(log_level="Debug").log_level == "debug"
    assert Settings(redis_url="rediss://:pw@cache:6380/3").redis_url == "rediss://:pw@cache:6380/3"


def test_one_port_for_both_listeners_is_refused() -> None:
    with pytest.raises(ValidationError, match="both 9000"):
        Settings(port=9000, grpc_port=9000)
    assert Settings(port=9000, grpc_port=9000, enable_grpc=False).port == 9000


def test_tls_material_is_loaded_at_start_up(tmp_path: Path) -> None:
    from tests.tls import self_signed

    cert, key = self_signed(tmp_path)
    assert Settings(tls_cert=str(cert), tls_key=str(key)).tls_cert == str(cert)
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")
    # A key that is not the certificate's; a file that is no PEM; an encrypted key (OpenSSL
    # would prompt for its passphrase on the terminal).
    (tmp_path / "text.pem").write_text("not pem\n")
    with pytest.raises(ValidationError, match="not a usable PEM certificate chain"):
        Settings(tls_cert=str(other_cert), tls_key=str(key))
    with pytest.raises(ValidationError, match="not a usable PEM certificate chain"):
        Settings(tls_cert=str(tmp_path / "text.pem"), tls_key=str(key))
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(loaded.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ValidationError, match="unencrypted key"):
        Settings(tls_cert=str(cert), tls_key=str(encrypted))


def test_unknown_variables_are_named_with_the_setting_meant() -> None:
    from ivvae.config import unknown_variables

    lines = unknown_variables({"IVVAE_REDIS_URI": "redis://x", "IVVAE_PORT": "1",
                               "IVVAE_API_KEY": "k", "IVVAE_ARTIFACT_DIR": "/a",
                               "IVVAE_COLOUR": "red", "HOME": "/root"})
    assert lines == [
        "IVVAE_COLOUR is not an ivvae setting and is ignored",
        "IVVAE_REDIS_URI is not an ivvae setting and is ignored (did you mean IVVAE_REDIS_URL?)",
    ]


def test_an_open_gateway_is_said_at_start_up() -> None:
    from ivvae.server import configuration_warnings

    # The clients' variable on the gateway: the operator meant a key, and there is none.
    assert any("IVVAE_API_KEYS, which is empty" in line for line in configuration_warnings(
        Settings(), {"IVVAE_API_KEY": "k"}))
    assert any("listens on 0.0.0.0" in line for line in configuration_warnings(
        Settings(host="0.0.0.0"), {}))
    assert configuration_warnings(Settings(), {}) == []  # loopback, no keys: a dev box
    assert configuration_warnings(Settings(host="0.0.0.0", api_keys="k1"), {}) == []


def test_a_variable_in_another_case_is_read_and_not_called_unknown() -> None:
    from ivvae.config import unknown_variables

    assert unknown_variables({"IVVAE_Port": "1", "ivvae_log_level": "info"}) == []


def test_the_dataset_encoder_names_a_bad_setting_of_its_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # encode-dataset's in-process encoder reads IVVAE_* too (its limits apply): a bad one
    # is the command's one-line error, not a pydantic traceback.
    from ivvae.dataset import DatasetError, EncoderSpec

    monkeypatch.setenv("IVVAE_LOG_LEVEL", "loud")
    with pytest.raises(DatasetError, match="IVVAE_LOG_LEVEL: 'loud' is not a log level"):
        EncoderSpec().build()
