"""Whole-video API, step functions and streaming on a tiny random model."""

from __future__ import annotations

import re

import pytest
import torch

from ivvae.model import IVVAE, StreamDecoder, StreamEncoder, latent_frames
from ivvae.model.vae import pad_space

from .conftest import make_model, rand_video

ATOL = 1e-5


def _stream_encode(model: IVVAE, video: torch.Tensor, chunk: int) -> torch.Tensor:
    enc = StreamEncoder(model, groups_per_step=1)
    mus = []
    for s in range(0, video.shape[2], chunk):
        mus += [mu for mu, _ in enc.push(video[:, :, s : s + chunk])]
    mus += [mu for mu, _ in enc.flush()]
    return torch.cat(mus, dim=2)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_streaming_encoder_equals_whole(tiny: IVVAE, chunk: int) -> None:
    video = rand_video(19, 24, 16)  # 19 = 1 + 4*4 + 2: the last group is padded
    mu_whole, _ = tiny.encode_moments(video, groups_per_step=16)
    mu_stream = _stream_encode(tiny, video, chunk)
    assert mu_stream.shape == mu_whole.shape == (1, 4, 6, 3, 2)
    assert (mu_stream - mu_whole).abs().max() <= ATOL


def test_streaming_emits_latent_frames_as_soon_as_groups_complete(tiny: IVVAE) -> None:
    enc = StreamEncoder(tiny, groups_per_step=1)
    video = rand_video(9, 16, 16)
    counts = []
    for t in range(9):
        counts.append(sum(mu.shape[2] for mu, _ in enc.push(video[:, :, t : t + 1])))
    # frame 0 -> latent 0 at once; frames 1-4 -> latent 1 at frame 4; frames 5-8 -> at 8
    assert counts == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert enc.flush() == []


def test_streaming_decoder_per_latent_frame_equals_whole(tiny: IVVAE) -> None:
    latent = tiny.encode(rand_video(13, 16, 24))
    whole = tiny.decode(latent, groups_per_step=8)
    dec = StreamDecoder(tiny)
    parts = [dec.push(latent[:, :, i : i + 1]) for i in range(latent.shape[2])]
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4]
    assert (torch.cat(parts, dim=2) - whole).abs().max() <= ATOL


def test_step_functions_chain_like_whole(tiny: IVVAE) -> None:
    video = rand_video(13, 16, 16)
    mu0, lv0, cache = tiny.encode_step(video[:, :, :5], None)
    mu1, lv1, cache = tiny.encode_step(video[:, :, 5:], cache)
    mu, lv = tiny.encode_moments(video)
    assert (torch.cat([mu0, mu1], 2) - mu).abs().max() <= ATOL
    assert (torch.cat([lv0, lv1], 2) - lv).abs().max() <= ATOL
    assert cache.batch_size == 1 and len(cache.tensors) == 13  # one slot per GCConv
    with pytest.raises(ValueError, match="4k frames"):
        tiny.encode_step(video[:, :, :3], cache)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        tiny.encode_step(video[:, :, :4], None)


def test_causality(tiny: IVVAE) -> None:
    video = rand_video(17, 16, 16)
    base, _ = tiny.encode_moments(video)
    for k in (0, 3, 4, 5, 12):
        changed = video.clone()
        changed[:, :, k] = -changed[:, :, k]
        mu, _ = tiny.encode_moments(changed)
        group = 0 if k == 0 else (k - 1) // 4 + 1  # latent frame that holds video frame k
        assert torch.equal(mu[:, :, :group], base[:, :, :group]), k
        assert (mu[:, :, group] - base[:, :, group]).abs().max() > 1e-4, k
    # decoder: changing latent frame i never changes frames before its group
    latent = tiny.encode(video)
    out = tiny.decode(latent)
    changed_latent = latent.clone()
    changed_latent[:, :, 2] += 1.0
    out2 = tiny.decode(changed_latent)
    assert torch.equal(out2[:, :, :5], out[:, :, :5])
    assert (out2[:, :, 5:9] - out[:, :, 5:9]).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("t", "h", "w"), [(1, 8, 8), (2, 9, 17), (6, 13, 7), (7, 1, 3), (10, 33, 20)]
)
def test_odd_sizes_round_trip_to_exact_shape(tiny: IVVAE, t: int, h: int, w: int) -> None:
    video = rand_video(t, h, w)
    latent = tiny.encode(video)
    assert latent.shape == (1, 4, latent_frames(t), -(-h // 8), -(-w // 8))
    out = tiny.decode(latent, num_frames=t, height=h, width=w)
    assert out.shape == video.shape


def test_padding_policy_repeats_last_frame_and_replicates_edges(tiny: IVVAE) -> None:
    video = rand_video(6, 12, 10)
    padded = torch.cat([video, video[:, :, -1:].expand(-1, -1, 3, -1, -1)], dim=2)
    padded = pad_space(padded)
    assert padded.shape[-2:] == (16, 16)
    assert torch.equal(padded[..., 15, :10], padded[..., 11, :10])
    assert torch.equal(padded[..., :, 15], padded[..., :, 9])
    a, _ = tiny.encode_moments(video)
    b, _ = tiny.encode_moments(padded)
    assert (a - b).abs().max() <= ATOL


def test_batch_of_two_videos_equals_each_alone(tiny: IVVAE) -> None:
    v1, v2 = rand_video(9, 16, 16, seed=1), rand_video(9, 16, 16, seed=2)
    both = tiny.encode(torch.cat([v1, v2]))
    assert (both[0:1] - tiny.encode(v1)).abs().max() <= ATOL
    assert (both[1:2] - tiny.encode(v2)).abs().max() <= ATOL
    dec = tiny.decode(both)
    assert (dec[1:2] - tiny.decode(both[1:2])).abs().max() <= ATOL


def test_batched_steps_with_concatenated_caches(tiny: IVVAE) -> None:
    from ivvae.model import FeatureCache

    v1, v2 = rand_video(9, 16, 16, seed=3), rand_video(9, 16, 16, seed=4)
    _, _, c1 = tiny.encode_step(v1[:, :, :1], None)
    _, _, c2 = tiny.encode_step(v2[:, :, :1], None)
    mu, _, cache = tiny.encode_step(torch.cat([v1, v2])[:, :, 1:], FeatureCache.concat([c1, c2]))
    s1, s2 = cache.split()
    assert s1.batch_size == s2.batch_size == 1
    assert (mu[0:1] - tiny.encode_moments(v1)[0][:, :, 1:]).abs().max() <= ATOL
    assert (mu[1:2] - tiny.encode_moments(v2)[0][:, :, 1:]).abs().max() <= ATOL


def test_sampling_is_seeded_and_deterministic_by_default(tiny: IVVAE) -> None:
    video = rand_video(5, 16, 16)
    assert torch.equal(tiny.encode(video), tiny.encode(video))
    a = tiny.encode(video, sample=True, generator=torch.Generator().manual_seed(7))
    b = tiny.encode(video, sample=True, generator=torch.Generator().manual_seed(7))
    c = tiny.encode(video, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    mu, _ = tiny.encode_moments(video)
    assert torch.allclose(tiny.encode(video), 0.9 * (mu + 0.1))


def test_feature_cache_size_does_not_grow_with_video_length(tiny: IVVAE) -> None:
    _, _, short = tiny.encode_step(rand_video(5, 16, 16), None)
    _, _, long = tiny.encode_step(rand_video(33, 16, 16), None)
    assert short.nbytes == long.nbytes
    assert len(short.tensors) == 13


def test_bf16_precision_cost_is_small() -> None:
    model = make_model()
    video = rand_video(9, 32, 32)
    ref = model.encode(video)
    model.set_precision(encode="bfloat16", decode="bfloat16")
    try:
        low = model.encode(video)
        assert low.dtype == torch.float32
        rel = (low - ref).norm() / ref.norm()
        assert 0 < rel < 0.05
        assert (model.decode(low) - model.decode(ref)).abs().max() > 0
    finally:
        model.set_precision(encode="float32", decode="float32")
    with pytest.raises(ValueError, match="CUDA only"):
        model.set_precision(encode="float16")
    with pytest.raises(ValueError, match="precision must be"):
        model.set_precision(decode="int8")


def test_bad_inputs_raise_value_errors(tiny: IVVAE) -> None:
    with pytest.raises(ValueError):
        tiny.encode(torch.zeros(1, 4, 5, 8, 8))
    with pytest.raises(ValueError):
        tiny.encode(torch.zeros(1, 3, 5, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        tiny.decode(torch.zeros(1, 5, 2, 1, 1))
    with pytest.raises(ValueError, match="do not come from"):
        tiny.decode(torch.zeros(1, 4, 2, 1, 1), num_frames=9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused(tiny: IVVAE, bad: float) -> None:
    # They used to come back as an all-NaN latent or video, with no error.
    video = rand_video(5, 8, 8)
    video[0, 1, 3, 2, 5] = bad
    with pytest.raises(ValueError, match="the video holds NaN or infinite values"):
        tiny.encode(video)
    with pytest.raises(ValueError, match="the video holds NaN or infinite values"):
        tiny.encode_moments(video)
    with pytest.raises(ValueError, match="the video holds NaN or infinite values"):
        StreamEncoder(tiny).push(video)
    latent = torch.zeros(1, 4, 2, 1, 1)
    latent[0, 2, 1] = bad
    with pytest.raises(ValueError, match="the latent holds NaN or infinite values"):
        tiny.decode(latent)
    with pytest.raises(ValueError, match="the latent holds NaN or infinite values"):
        StreamDecoder(tiny).push(latent)


def test_finite_check_keeps_autograd() -> None:
    model = make_model().requires_grad_(True)
    video = rand_video(5, 8, 8).requires_grad_(True)
    model.decode(model.encode(video)).square().mean().backward()
    assert video.grad is not None and bool(torch.isfinite(video.grad).all())


@pytest.mark.parametrize(
    ("shape", "message"),
    [((0, 4, 2, 1, 1), "batch size 0"),
     ((1, 4, 0, 1, 1), r"no latent frames \(n = 0\)"),
     ((1, 4, 2, 0, 1), "h, w >= 1"),
     ((1, 5, 2, 1, 1), r"\(B, 4, n, h, w\) for this 4-channel model"),
     ((4, 2, 1, 1), r"\(B, 4, n, h, w\)")])
def test_decode_checks_the_latent_shape_first(tiny: IVVAE, shape: tuple[int, ...],
                                              message: str) -> None:
    # A batch of 0 was a ZeroDivisionError deep in the network; 0 latent frames "-3 frames".
    with pytest.raises(ValueError, match=message):
        tiny.decode(torch.zeros(shape))
    with pytest.raises(ValueError, match=message):
        StreamDecoder(tiny).push(torch.zeros(shape))


def test_stream_encoder_refuses_pushes_after_flush(tiny: IVVAE) -> None:
    video = rand_video(6, 8, 8)
    enc = StreamEncoder(tiny, groups_per_step=1)
    enc.push(video[:, :, :3])
    enc.flush()
    # The padding flush() added would have ended up in the middle of the video.
    with pytest.raises(RuntimeError, match="was flushed: start a new one"):
        enc.push(video[:, :, 3:])
    assert enc.flush() == []  # a second flush has nothing left to do


@pytest.mark.parametrize("other", [(2, 3, 4, 8, 8), (1, 3, 4, 16, 8), (1, 3, 4, 8, 7)])
def test_stream_encoder_refuses_a_change_of_batch_or_frame_size(
        tiny: IVVAE, other: tuple[int, ...]) -> None:
    enc = StreamEncoder(tiny, groups_per_step=1)
    enc.push(rand_video(3, 8, 8))
    with pytest.raises(ValueError, match=(
            rf"frames are {re.escape(str(other))} but the first push's were "
            r"\(1, 3, 3, 8, 8\)")):
        enc.push(torch.zeros(other))
