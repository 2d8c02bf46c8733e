"""The contract between the gateway and the Triton models: one place for each name.

Standard library only: the gateway (no torch), the Triton python models, ``ivvae
triton-serve`` and ``docker/triton_prepare.py`` all import it.

One video = one Triton *sequence* (sequence batching, ``oldest`` strategy), with a random
correlation id in ``[1, 2**63 - 1]``. Every request carries batch dimension 1 (this video's
step); Triton gathers steps of several videos into one ``execute()`` call and the model
runs steps of equal size as one batch.

=========  ===========================  =================================================
model      inputs                       outputs
=========  ===========================  =================================================
encoder    ``FRAMES`` uint8             ``MU``, ``LOGVAR`` float32
           ``(1, T, H, W, 3)``          ``(1, z, T', H/8, W/8)``
decoder    ``LATENT`` float32           ``FRAMES`` uint8 ``(1, T, 8h, 8w, 3)``, or
           ``(1, z, n, h, w)``          ``FRAMES_FP32`` float32, same layout
=========  ===========================  =================================================

The decoder answers with ``FRAMES``, or with ``FRAMES_FP32`` alone when a request asks for
that output alone: the decoder's own values (about [-1, 1], not clamped) that ``FRAMES``
is rounded from. A sequence may change its ask from step to step; steps are batched with
others that ask the same.

The first step of a sequence (``sequence_start``) takes one frame (encoder) or one latent
frame (decoder); later steps take ``4k`` frames or ``k`` latent frames, at the size of the
first step. Frames are RGB uint8, H and W multiples of 8 (the gateway pads).

Ending a sequence: the gateway does not know which step is the last until the pipeline
closes the session, so it ends the sequence with an extra request that carries
``sequence_end`` and ``RELEASE = true`` and no data: the model frees the sequence's cache and
answers with no outputs. A sequence that is never ended (a gateway crash) is dropped after
``SEQUENCE_TTL_S`` seconds without a step.

Errors, per request (the other requests of a batch are unaffected):

* ``INVALID_ARGUMENT``: the request is wrong (shape, size change mid-sequence, non-finite
  latent). Triton itself answers ``INVALID_ARGUMENT`` with "must specify the START flag" for
  a step of a sequence it does not know (never started, idled out, or the server restarted).
* ``UNAVAILABLE``: the model has no state for the sequence (expired or the model instance
  restarted): the stream is lost and must start again. Also on a first step whose
  ``ivvae_weights_sha256`` request parameter names other weights than the model serves.
* ``INTERNAL``: the step failed in the model.

The served model's description (name, z_dim, scale and shift factors, weights hash, ...)
is the ``MODEL_INFO`` parameter of both models' config: a JSON object written when the
repository is prepared from the export manifest. The gateway reads it with
``get_model_config``, so it needs neither torch nor the weights; the models refuse to load
when it disagrees with the artifacts they serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ENCODER_MODEL = "ivvae_encoder"
DECODER_MODEL = "ivvae_decoder"

# The models' gauges, on Triton's metrics port; the local backend exports the same names.
OPEN_SEQUENCES_METRIC = "ivvae_open_sequences"
EVICTED_SEQUENCES_METRIC = "ivvae_evicted_sequences"

# -- tensors -----------------------------------------------------------------------------------
FRAMES = "FRAMES"
FRAMES_FP32 = "FRAMES_FP32"  # the decoder's float frames, when a request asks for them
LATENT = "LATENT"
MU = "MU"
LOGVAR = "LOGVAR"
RELEASE = "RELEASE"  # optional BOOL (1, 1): with sequence_end, free the state; no step
# Sequence-batcher control inputs (int32 (1, 1); CORRID uint64 (1, 1)).
START = "START"
END = "END"
READY = "READY"
CORRID = "CORRID"

# direction -> (data input, outputs)
TENSORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "encoder": (FRAMES, (MU, LOGVAR)),
    "decoder": (LATENT, (FRAMES,)),
}
# the decoder's output per frames dtype (ivvae.core.steps.FRAMES_DTYPES)
DECODER_FRAMES = {"uint8": FRAMES, "float32": FRAMES_FP32}

# -- model-config parameters -----------------------------------------------------------------
ARTIFACT_DIR = "ARTIFACT_DIR"  # directory of exported artifacts (export_manifest.json)
ARTIFACT_DIR_ENV = "IVVAE_ARTIFACT_DIR"  # fallback when the parameter is empty
ARTIFACT_FORMAT = "ARTIFACT_FORMAT"  # torchscript | onnx; must match the manifest
PRECISION = "PRECISION"  # float32 | bfloat16 | float16 (TorchScript only)
SEQUENCE_TTL_S = "SEQUENCE_TTL_S"  # empty: max_sequence_idle_microseconds
NUM_THREADS = "NUM_THREADS"  # intra-op CPU threads per instance; empty: the library default
MODEL_INFO = "MODEL_INFO"  # ModelInfo.to_json() of the served model

# Request parameter of a sequence's first step: the weights the gateway expects. A model
# serving other weights refuses the sequence (UNAVAILABLE) instead of answering with latents
# of another model.
WEIGHTS_PARAMETER = "ivvae_weights_sha256"

# Triton accepts unsigned 64-bit ids, tritonclient sends integers as int64.
MAX_CORRELATION_ID = 2**63 - 1
# Triton's message for a step of a sequence it does not know (never started or dropped).
UNKNOWN_SEQUENCE_MESSAGE = "must specify the START flag"

def string_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """``{key: string_value}`` of a model config as JSON (``get_model_config`` or the
    ``model_config`` argument of a python model's ``initialize``)."""
    params = config.get("parameters", {}) or {}
    return {k: str((v or {}).get("string_value", "")) for k, v in params.items()}
