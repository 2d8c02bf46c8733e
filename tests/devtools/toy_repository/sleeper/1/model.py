"""Toy python-backend model: sleeps for the requested number of seconds, then echoes it."""

from __future__ import annotations

import time
from typing import Any

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            seconds = pb_utils.get_input_tensor_by_name(request, "SECONDS").as_numpy()
            time.sleep(float(seconds.max()))
            output = pb_utils.Tensor("SECONDS_SLEPT", seconds)
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
