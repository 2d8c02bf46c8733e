"""Triton python model ``ivvae_decoder``: a thin adapter over the exported decoder steps.

It loads the artifacts named by the ``ARTIFACT_DIR`` parameter (TorchScript or ONNX Runtime,
per ``ARTIFACT_FORMAT``), keeps one feature cache per sequence (video) keyed by its
correlation id, and runs the steps that Triton's sequence batcher hands it, batched by size.
The adapter is ``ivvae.triton.python_model.StepModel``; the tensor contract is
``ivvae.triton.contract``.
"""

from __future__ import annotations

from ivvae.triton.python_model import StepModel


class TritonPythonModel(StepModel):
    direction = "decoder"
