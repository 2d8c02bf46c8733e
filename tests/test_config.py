"""ivvae.config.Settings refuses, at start-up, values that would silently do the wrong thing."""

from __future__ import annotations

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
