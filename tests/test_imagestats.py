"""Per-image statistics and their streamed form (bnnpan/models/imagestats.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnnpan.models import imagestats as im
from bnnpan.models.networks import NetConfig, build_network


def _nudged_bnnpan(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    net = build_network("bnnpan", NetConfig(in_channels=3, width=8, depth=depth, ratio=2, zero_init_tail=False))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _tiles(h: int, w: int, t: int, halo: int):
    for i in range(0, h, t):
        for j in range(0, w, t):
            a, b, c, d = i, min(h, i + t), j, min(w, j + t)
            ia, ib, ja, jb = max(0, a - halo), min(h, b + halo), max(0, c - halo), min(w, d + halo)
            yield (ia, ib, ja, jb), im.Window((ia, ja), (a, b, c, d))


def test_without_a_context_the_moments_are_the_tensors_own():
    x = torch.randn(2, 5, 17, 23) * 3 + 1
    with torch.no_grad():
        m, v = im.channel_moments(nn.Identity(), x)
    vd, md = torch.var_mean(x.double(), dim=(2, 3), keepdim=True, correction=0)
    assert m.dtype == v.dtype == torch.float32 and m.shape == v.shape == (2, 5, 1, 1)
    assert torch.equal(m, md.float()) and torch.allclose(v, vd.float(), rtol=1e-7, atol=0)
    # with autograd (training): float32 and differentiable, the same values to float rounding
    xg = x.clone().requires_grad_(True)
    mg, vg = im.channel_moments(nn.Identity(), xg)
    (mg.sum() + vg.sum()).backward()
    assert xg.grad is not None and torch.allclose(vg, vd.float(), rtol=1e-5) and torch.allclose(mg, md.float(),
                                                                                               atol=1e-6)
    assert im.channel_moments(nn.Identity(), x, var=False)[1] is None


def test_streamed_statistics_of_tiles_are_the_whole_images(one_thread):
    """Image not a multiple of 4 (E2 pads it), tiles not dividing it, halo on the 16-pixel grid: every streamed
    statistic equals the single pass's to float32 rounding, and the stitched output the single pass's."""
    net = _nudged_bnnpan()
    g = torch.Generator().manual_seed(1)
    h, w = 150, 118
    lms, pan = 0.2 + 0.5 * torch.rand(1, 3, h, w, generator=g), 0.2 + 0.5 * torch.rand(1, 1, h, w, generator=g)
    with torch.no_grad():
        ref = net(lms, pan)
        with im.recording() as rec:
            net(lms, pan)
    assert [int(getattr(m, "stat_stride", 1)) for m, *_ in rec] == [16, 2, 1, 2, 1]
    stats = im.SceneStats()
    tiles = list(_tiles(h, w, 48, 64))
    with torch.no_grad():
        for _ in range(len(rec)):
            for (ia, ib, ja, jb), where in tiles:
                with im.streaming(stats, where):
                    net(lms[..., ia:ib, ja:jb], pan[..., ia:ib, ja:jb])
                    pytest.fail("a streaming pass must stop at its statistic")
            stats.close()
        for k, (_, m, v, _) in enumerate(rec):  # float32 rounding: a tile's conv kernels may differ from the whole's
            assert torch.allclose(stats.known[k][0], m, rtol=1e-6, atol=1e-6 * float(m.abs().max())), k
            assert v is None or torch.allclose(stats.known[k][1], v, rtol=1e-6), k
        out = torch.zeros_like(ref)
        for (ia, ib, ja, jb), where in tiles:
            with im.streaming(stats, where):
                o = net(lms[..., ia:ib, ja:jb], pan[..., ia:ib, ja:jb])
            a, b, c, d = where.core
            out[..., a:b, c:d] = o[..., a - ia : b - ia, c - ja : d - ja]
    assert (out - ref).abs().max() <= 1e-6
    assert (ref - lms).abs().max() > 1e-2  # the network does something


def test_a_window_off_the_statistics_grid_is_an_error():
    net = _nudged_bnnpan(depth=1)
    lms, pan = torch.rand(1, 3, 64, 64), torch.rand(1, 1, 64, 64)
    with torch.no_grad(), pytest.raises(ValueError, match="16-pixel grid"), \
            im.streaming(im.SceneStats(), im.Window((8, 0), (8, 40, 0, 64))):
        net(lms, pan)


def test_a_module_reduced_twice_in_one_pass_is_refused():
    class Twice(nn.Module):
        def forward(self, x):
            return im.channel_moments(self, x)[0] + im.channel_moments(self, x)[0]

    with pytest.raises(RuntimeError, match="reduced twice"), im.recording():
        Twice()(torch.rand(1, 2, 8, 8))


def test_close_without_an_accumulated_statistic_is_an_error():
    with pytest.raises(RuntimeError, match="no unknown"):
        im.SceneStats().close()
