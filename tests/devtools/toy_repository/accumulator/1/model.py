"""Toy stateful python-backend model: a running sum per sequence (correlation id).

Requests of different sequences arrive batched in one ``execute()`` call (sequence batcher,
``oldest`` strategy). Each request carries its own control inputs, all shaped (1, 1):
START, END, READY as int32 and CORRID as uint64. The state lives in this stub process.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        # Triton frees an idle sequence's slot without telling the model: forget its sum
        # after the same time, or the dict grows with every abandoned sequence.
        idle_us = int(config["sequence_batching"]["max_sequence_idle_microseconds"])
        self._ttl_s = idle_us / 1e6
        parameters = config.get("parameters", {})
        self._log = parameters.get("LOG_EXECUTIONS", {}).get("string_value") == "1"
        self._sums: dict[int, int] = {}
        self._last_seen: dict[int, float] = {}

    def execute(self, requests: list[Any]) -> list[Any]:
        now = time.monotonic()
        for corrid in [c for c, t in self._last_seen.items() if now - t > self._ttl_s]:
            del self._sums[corrid], self._last_seen[corrid]
        if self._log:
            self._describe(requests)
        return [self._step(request, now) for request in requests]

    def _step(self, request: Any, now: float) -> Any:
        def scalar(name: str) -> Any:
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy().item()

        corrid = int(scalar("CORRID"))
        value = int(scalar("INPUT"))
        if not scalar("READY"):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("request not ready"))
        if value < 0:
            # Fails this request only (the client sees INVALID_ARGUMENT); the other requests
            # of the batch succeed and this sequence's sum is unchanged.
            message = f"negative input {value} for sequence {corrid}"
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
            )
        if scalar("START"):
            self._sums[corrid] = 0
        elif corrid not in self._sums:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"sequence {corrid} has no state (never started?)")
            )
        self._sums[corrid] += value
        self._last_seen[corrid] = now
        total = self._sums[corrid]
        if scalar("END"):
            del self._sums[corrid], self._last_seen[corrid]
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array([[total]], dtype=np.int64)),
                pb_utils.Tensor("CORRID_SEEN", np.array([[corrid]], dtype=np.uint64)),
            ]
        )

    def _describe(self, requests: list[Any]) -> None:
        parts = []
        for request in requests:
            fields = []
            for name in ("INPUT", "START", "END", "READY", "CORRID"):
                array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                fields.append(f"{name}={array.dtype}{list(array.shape)}:{array.ravel().tolist()}")
            parts.append(" ".join(fields))
        print(f"execute batch={len(requests)} | " + " | ".join(parts), file=sys.stderr, flush=True)

    def finalize(self) -> None:
        if self._log:
            print(f"finalize with {len(self._sums)} open sequences", file=sys.stderr, flush=True)
