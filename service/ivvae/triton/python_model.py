"""The Triton python-backend adapter shared by ``ivvae_encoder`` and ``ivvae_decoder``.

``model_repository/<name>/1/model.py`` subclasses :class:`StepModel` and names its
direction; this module does what a python model does: parse the config once, load the
exported artifacts, turn each request into a :class:`~ivvae.core.steps.StepRequest`,
and return exactly one response per request, with errors attached per request. State and
batching live in the step engine, :class:`~ivvae.core.steps.SequenceTable`.

Configuration (model-config parameters, see ``ivvae.triton.contract``): ``ARTIFACT_DIR``
(else the ``IVVAE_ARTIFACT_DIR`` environment variable), ``ARTIFACT_FORMAT``, ``PRECISION``,
``SEQUENCE_TTL_S``, ``NUM_THREADS``, ``MODEL_INFO``. Weights and artifacts come from the
local file system only. ``KIND_GPU`` instances run on ``cuda:<device id>``.

Only importable inside Triton's python stub (``triton_python_backend_utils``).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, ClassVar

import numpy as np

from ..core.artifacts import ArtifactError, Direction, read_manifest
from ..core.model_info import ModelInfo
from ..core.steps import ErrorKind, FramesDtype, SequenceTable, StepRequest, StepResult
from ..model.artifacts import load_steps
from . import contract as c

DEFAULT_TTL_S = 120.0
SWEEP_INTERVAL_S = 1.0


class StepModel:
    """Base of the two ``TritonPythonModel`` classes; subclasses set ``direction``."""

    direction: ClassVar[Direction]

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.name = str(config["name"])
        self.instance = str(args.get("model_instance_name", self.name))
        params = c.string_parameters(config)
        artifact_dir = params.get(c.ARTIFACT_DIR) or os.environ.get(c.ARTIFACT_DIR_ENV, "")
        if not artifact_dir:
            raise ArtifactError(f"{self.name}: set the {c.ARTIFACT_DIR} parameter or "
                                f"{c.ARTIFACT_DIR_ENV} to a directory written by `ivvae export`")
        manifest = read_manifest(artifact_dir)
        self.weights = manifest.weights_sha256
        fmt = params.get(c.ARTIFACT_FORMAT) or manifest.format
        if fmt != manifest.format:
            raise ArtifactError(f"{self.name}: {c.ARTIFACT_FORMAT}={fmt} but {artifact_dir} "
                                f"holds {manifest.format} artifacts")
        if params.get(c.MODEL_INFO):
            served = ModelInfo.from_json(params[c.MODEL_INFO])
            if served.weights_sha256 != manifest.weights_sha256:
                raise ArtifactError(
                    f"{self.name}: {c.MODEL_INFO} names weights {served.weights_sha256[:12]}"
                    f" but {artifact_dir} was exported from {manifest.weights_sha256[:12]}; "
                    "prepare the repository again")
        else:
            self._log("warn", f"no {c.MODEL_INFO} parameter: gateways cannot learn which "
                              "model this is; prepare the repository with `ivvae triton-serve` "
                              "or docker/triton_prepare.py")
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
        precision = params.get(c.PRECISION) or "float32"
        threads = int(params.get(c.NUM_THREADS) or 0)
        steps = load_steps(artifact_dir, self.direction, device=device, precision=precision,
                           threads=threads, manifest=manifest)
        idle_us = int(config.get("sequence_batching", {}).get(
            "max_sequence_idle_microseconds", 0) or 0)
        ttl_s = float(params.get(c.SEQUENCE_TTL_S) or idle_us / 1e6 or DEFAULT_TTL_S)
        self.table = SequenceTable(steps, ttl_s=ttl_s)
        self.input_name, self.output_names = c.TENSORS[self.direction]
        self._metrics = self._make_metrics()
        self._stop = threading.Event()
        # Triton does not tell the model when a sequence idles out: sweep on our own clock.
        self._sweeper = threading.Thread(target=self._sweep, name=f"{self.name}-ttl",
                                         daemon=True)
        self._sweeper.start()
        self._log("info", f"{self.name}: {manifest.format} artifacts from {artifact_dir} "
                          f"(model {manifest.model.get('name')}, weights "
                          f"{manifest.weights_sha256[:12]}) on {device}, {precision}, "
                          f"sequence ttl {ttl_s:g} s")

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        parsed = [self._parse(request) for request in requests]
        steps = [(i, p) for i, p in enumerate(parsed) if isinstance(p, StepRequest)]
        results = dict(zip([i for i, _ in steps],
                           self.table.execute([p for _, p in steps]), strict=True))
        responses = []
        for i, p in enumerate(parsed):
            result = p if isinstance(p, StepResult) else results[i]
            if result.kind is not None:
                responses.append(self._error(result.kind, result.error))
            else:
                assert isinstance(p, StepRequest)
                names = (self.output_names if self.direction == "encoder"
                         else (c.DECODER_FRAMES[p.frames_dtype],))
                tensors = [pb.Tensor(name, out)
                           for name, out in zip(names, result.outputs, strict=False)]
                responses.append(pb.InferenceResponse(output_tensors=tensors))
        self._observe()
        return responses

    def finalize(self) -> None:
        self._stop.set()
        self._sweeper.join(timeout=5)
        self._log("info", f"{self.name}: finalize with {len(self.table)} open sequences")

    # -- helpers ---------------------------------------------------------------------------

    def _parse(self, request: Any) -> StepRequest | StepResult:
        """The request as a StepRequest, or the failed result it gets without running."""
        pb = self.pb

        def value(name: str) -> np.ndarray | None:
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        controls = {name: value(name) for name in (c.START, c.END, c.READY, c.CORRID)}
        flags = {name: v.item() for name, v in controls.items() if v is not None and v.size == 1}
        if len(flags) != len(controls):
            return StepResult.failed(ErrorKind.INVALID, "control inputs missing: is sequence "
                                                        "batching configured?")
        if not flags[c.READY]:
            return StepResult.failed(ErrorKind.INVALID, "request not ready")
        start = bool(flags[c.START])
        if start and self._wrong_weights(request):
            return StepResult.failed(
                ErrorKind.LOST, f"{self.name} serves weights {self.weights[:12]}, not the "
                                "ones this sequence was meant for; ask the server again")
        release = value(c.RELEASE)
        frames_dtype: FramesDtype = "uint8"
        # A request that names no outputs is handed all of them by Triton: FRAMES_FP32
        # alone is the ask for float frames.
        if self.direction == "decoder" and set(_requested_outputs(request)) == {c.FRAMES_FP32}:
            frames_dtype = "float32"
        return StepRequest(corrid=int(flags[c.CORRID]), start=start, end=bool(flags[c.END]),
                           release=bool(release is not None and release.any()),
                           array=value(self.input_name), frames_dtype=frames_dtype)

    def _wrong_weights(self, request: Any) -> bool:
        """Whether the request names other weights (``WEIGHTS_PARAMETER``) than served."""
        try:
            parameters = json.loads(request.parameters() or "{}")
        except (AttributeError, ValueError):  # a stub without request parameters
            return False
        wanted = parameters.get(c.WEIGHTS_PARAMETER)
        return wanted is not None and wanted != self.weights

    def _error(self, kind: ErrorKind, message: str) -> Any:
        pb = self.pb
        code = {ErrorKind.INVALID: pb.TritonError.INVALID_ARG,
                ErrorKind.LOST: pb.TritonError.UNAVAILABLE,
                ErrorKind.INTERNAL: pb.TritonError.INTERNAL}[kind]
        return pb.InferenceResponse(error=pb.TritonError(message, code))

    def _sweep(self) -> None:
        interval = min(SWEEP_INTERVAL_S, self.table.ttl_s / 4)
        while not self._stop.wait(interval):
            if self.table.evict_expired():
                self._observe()

    def _make_metrics(self) -> dict[str, Any]:
        pb = self.pb
        if not hasattr(pb, "MetricFamily"):
            return {}
        labels = {"model": self.name, "instance": self.instance}
        open_family = pb.MetricFamily(
            name=c.OPEN_SEQUENCES_METRIC,
            description="Sequences (videos) whose feature cache this model instance holds",
            kind=pb.MetricFamily.GAUGE)
        evicted_family = pb.MetricFamily(
            name=c.EVICTED_SEQUENCES_METRIC,
            description="Sequences dropped after their time-to-live without a step",
            kind=pb.MetricFamily.GAUGE)
        return {"open": open_family.Metric(labels=labels),
                "evicted": evicted_family.Metric(labels=labels),
                "families": (open_family, evicted_family)}

    def _observe(self) -> None:
        if self._metrics:
            self._metrics["open"].set(len(self.table))
            self._metrics["evicted"].set(self.table.evicted)

    def _log(self, level: str, message: str) -> None:
        logger = getattr(self.pb, "Logger", None)
        if logger is None:
            print(message, flush=True)
        elif level == "warn":
            logger.log_warn(message)
        else:
            logger.log_info(message)


def _requested_outputs(request: Any) -> list[str]:
    """The outputs a request names (Triton fills in all of them when it names none)."""
    names = getattr(request, "requested_output_names", None)
    return list(names()) if names is not None else []
