"""The fused inference path of the KTC convolution against the plain one (autograd on)."""

from __future__ import annotations

import pytest
import torch

from ivvae.model.layers import SepConv3d, channels_last


def _both(conv: SepConv3d, x: torch.Tensor, prev: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fused = conv(x, prev)
    # With autograd recording, the layer takes the plain path: padded stacks + Conv3d.
    xr = x.clone().requires_grad_(True)
    plain = conv(xr, prev).detach()
    return fused, plain


@pytest.mark.parametrize(("group", "frames"), [(4, 4), (4, 12), (2, 6), (1, 3)])
def test_fused_gcconv_equals_padded_stacks(group: int, frames: int) -> None:
    torch.manual_seed(0)
    conv = SepConv3d(6, 5, 3, group)
    x = channels_last(torch.randn(2, 6, frames, 9, 7))
    prev = channels_last(torch.randn(2, 6, 1, 9, 7))
    fused, plain = _both(conv, x, prev)
    assert fused.shape == plain.shape == (2, 10, frames, 9, 7)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_fused_gcconv_first_frame_equals_padded_stack() -> None:
    torch.manual_seed(1)
    conv = SepConv3d(4, 3, 3, 4)
    fused, plain = _both(conv, channels_last(torch.randn(1, 4, 1, 8, 8)), None)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_fused_pointwise_equals_two_convs() -> None:
    torch.manual_seed(2)
    conv = SepConv3d(6, 4, 1)
    fused, plain = _both(conv, channels_last(torch.randn(1, 6, 3, 5, 5)), None)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_fused_weights_follow_a_weight_change() -> None:
    torch.manual_seed(3)
    conv = SepConv3d(4, 3, 3, 2)
    x = channels_last(torch.randn(1, 4, 2, 6, 6))
    prev = channels_last(torch.randn(1, 4, 1, 6, 6))
    with torch.no_grad():
        before = conv(x, prev)
        conv.conv_3d.weight.mul_(2.0)  # in place: what load_state_dict does
        after = conv(x, prev)
    _, plain = _both(conv, x, prev)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, plain, rtol=1e-5, atol=1e-5)
