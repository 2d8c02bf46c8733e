"""What a gateway knows about a served model (no weights), and its wire forms."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """A served model: its name, shape, latent scaling and weights identity.

    ``source`` says where the weights came from: a path, ``bundled``, ``untrained``, or
    ``triton:<source>``. The dict form (:meth:`as_dict`) is what ``/models``, gRPC
    ``ListModels``, export manifests and Triton's ``MODEL_INFO`` parameter carry.
    """

    name: str
    z_dim: int
    dim: int
    scale_factor: float
    shift_factor: float
    weights_sha256: str
    trained: bool
    source: str
    num_params: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelInfo:
        """Inverse of :meth:`as_dict`; ``ValueError`` naming what is missing or malformed."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw]
        if missing:
            raise ValueError(f"model description lacks {missing}")
        try:
            return cls(name=str(raw["name"]), z_dim=int(raw["z_dim"]), dim=int(raw["dim"]),
                       scale_factor=float(raw["scale_factor"]),
                       shift_factor=float(raw["shift_factor"]),
                       weights_sha256=str(raw["weights_sha256"]), trained=bool(raw["trained"]),
                       source=str(raw["source"]), num_params=int(raw["num_params"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed model description: {exc}") from None

    def to_json(self) -> str:
        """The JSON form (Triton's ``MODEL_INFO`` model-config parameter)."""
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model description is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("model description must be a JSON object")
        return cls.from_dict(value)
