"""How a clip is encoded: with the model in this process (``LocalEncoder``) or through a
running service (``ServiceEncoder``); ``EncoderSpec`` says which, picklable for Ray actors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import BackendUnavailable, DeadlineExceeded, IVVAEError, Overloaded
from ..latents import ENCODE_PRECISION_KEY, LatentInfo
from .job import ClipOptions, DatasetError, ModelIdentity

if TYPE_CHECKING:
    from ..config import Settings


@dataclass(frozen=True)
class Encoded:
    data: bytes  # the latent .safetensors file
    info: LatentInfo


class ClipEncoder(Protocol):
    async def start(self, model: str = "") -> ModelIdentity: ...
    async def encode(self, source: bytes | Path, options: ClipOptions, name: str) -> Encoded: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class EncoderSpec:
    """How to encode, picklable (a Ray actor builds its encoder from it): through the
    service at ``server``, else in-process with ``weights`` (empty: bundled) on ``device``."""

    server: str = ""
    weights: str = ""
    device: str = "cpu"
    encode_precision: str = "float32"
    torch_threads: int = 0
    api_key: str | None = None
    ca_cert: str | None = None
    timeout: float = 600.0
    retries: int = 6
    # 1: every clip's model steps run alone, so its latent is bit for bit what encoding it
    # alone gives. More batches steps of concurrent clips (faster on a GPU), and float
    # reductions over a batch then differ in the last bits.
    batch_max_size: int = 1

    def build(self) -> ClipEncoder:
        if self.server:
            return ServiceEncoder(self)
        from pydantic import ValidationError

        from ..config import Settings, settings_problems

        try:
            settings = Settings(
                backend="local", redis_url="", weights=self.weights, device=self.device,
                encode_precision=self.encode_precision,
                torch_threads=self.torch_threads, cache_memory_max_bytes=0,
                enable_http=False, enable_grpc=False, request_timeout_s=self.timeout,
                batch_max_size=self.batch_max_size)
        except ValidationError as exc:  # the IVVAE_* environment (its limits apply here)
            raise DatasetError("invalid settings for the in-process encoder: "
                               + "; ".join(settings_problems(exc))) from None
        return LocalEncoder(settings)


class LocalEncoder:
    """The model in this process (``ivvae.service.Service`` with the local backend)."""

    def __init__(self, settings: Settings) -> None:
        from ..service import Service

        self.service = Service(settings)

    async def start(self, model: str = "") -> ModelIdentity:
        """Load the weights; the identity of ``model`` (empty: the default one)."""
        await self.service.start()
        try:
            info = self.service.pipeline.model(model)
        except IVVAEError as exc:
            raise DatasetError(exc.detail) from exc
        return ModelIdentity(info.name, info.weights_sha256,
                             self.service.settings.encode_precision)

    async def encode(self, source: bytes | Path, options: ClipOptions, name: str) -> Encoded:
        from ..pipeline import EncodeOptions
        from ..video.preprocess import Preprocess

        result = await self.service.pipeline.encode(source, EncodeOptions(
            model=options.model, sample=options.sample, seed=options.clip_seed(name),
            dtype=options.dtype, include_moments=options.moments,
            preprocess=Preprocess.from_canonical(options.preprocess)))
        return Encoded(result.data, result.info)

    async def close(self) -> None:
        await self.service.close()


class ServiceEncoder:
    """A running ivvae service (gRPC or HTTP), retried on UNAVAILABLE."""

    def __init__(self, spec: EncoderSpec) -> None:
        from ..client import AsyncClient, RetryPolicy

        self.client = AsyncClient(spec.server, api_key=spec.api_key, timeout=spec.timeout,
                                  retry=RetryPolicy(attempts=spec.retries + 1),
                                  ca_cert=spec.ca_cert)
        self.identity: ModelIdentity | None = None  # the job's model, from start()

    async def start(self, model: str = "") -> ModelIdentity:
        try:
            models = await self.client.models()
        except (BackendUnavailable, Overloaded, DeadlineExceeded, OSError) as exc:
            raise DatasetError(f"the service at {self.client.url} is unavailable: "
                               f"{getattr(exc, 'detail', exc)}") from exc
        name = model or models.default
        for m in models.models:
            if m.name == name:
                self.identity = ModelIdentity(m.name, m.weights_sha256,
                                              models.encode_precision or "server")
                return self.identity
        raise DatasetError(f"the service serves no model {name!r} (it serves {models.names()})")

    async def encode(self, source: bytes | Path, options: ClipOptions, name: str) -> Encoded:
        from ..video.preprocess import Preprocess

        try:
            result = await self.client.encode(
                source, model=options.model, sample=options.sample,
                seed=options.clip_seed(name), dtype=options.dtype, moments=options.moments,
                preprocess=Preprocess.from_canonical(options.preprocess))
        except (BackendUnavailable, Overloaded) as exc:  # already retried: give up the run
            raise DatasetError(
                f"the service at {self.client.url} is unavailable: {exc.detail}") from exc
        except DeadlineExceeded as exc:
            # A slow clip is the clip's failure; a service that answers nothing at all (a
            # stopped or wedged process keeps its socket) would fail every clip after the
            # whole timeout, so a liveness check decides which this was.
            if not await self.client.answers():
                raise DatasetError(
                    f"the service at {self.client.url} gave no answer for {name} "
                    f"({exc.detail}) and does not answer a liveness check either: giving up "
                    "the run (what is encoded is kept; rerun to go on)") from exc
            raise
        made, job = result.info, self.identity
        if job is not None:
            precision = made.extra.get(ENCODE_PRECISION_KEY, job.encode_precision)
            if (made.model_name, made.weights_sha256, precision) != (
                    job.name, job.weights_sha256, job.encode_precision):
                # The service changed under the run (restarted with other weights or
                # precision, or replicas behind one address that differ): one dataset
                # must never mix two models.
                raise DatasetError(
                    f"the service at {self.client.url} encoded {name} with model "
                    f"{made.model_name!r} (weights {made.weights_sha256[:12]}, "
                    f"{precision}), not the job's {job.name!r} (weights "
                    f"{job.weights_sha256[:12]}, {job.encode_precision}) it served at the "
                    "start: giving up the run (nothing of this clip was written). Rerun "
                    "once the service serves the job's model again (to the new one, a "
                    "rerun is another job: --new-version)")
        return Encoded(result.data, result.info)

    async def close(self) -> None:
        await self.client.close()
