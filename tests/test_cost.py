"""Cost accounting by hooks (bnnpan.eval.cost) on the real networks of every method, and on a hand-made module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnnpan.eval.cost import ROW_COLUMNS, TABLE_COLUMNS, cost_table, count_cost
from bnnpan.models.networks import NetConfig, build_network

METHODS = ("fp", "bnn", "xnor", "bireal", "irnet", "reactnet", "btm", "bbcu", "bisrnet")
BINARY = tuple(m for m in METHODS if m != "fp")
D, N = 32, 4
SIZES = ((64, 64), (256, 256))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one intra-op thread (conftest.py)


@pytest.fixture(scope="module", params=(3, 4), ids=lambda c: f"C{c}")
def reports(request) -> dict:
    """method -> {(H, W): CostReport} for C in (3, 4), D=32, N=4."""
    c = request.param
    torch.manual_seed(0)
    out = {}
    for m in METHODS:
        net = build_network(m, NetConfig(in_channels=c, width=D, depth=N))
        out[m] = {hw: count_cost(net, c, *hw) for hw in SIZES}
    return {"C": c, "by_method": out}


def test_totals_are_sums_of_rows(reports):
    for m, by_size in reports["by_method"].items():
        for rep in by_size.values():
            rows = rep.rows
            assert list(rows.columns) == list(ROW_COLUMNS)
            assert rep.binary_params == rows["binary_params"].sum(), m
            assert rep.fp_params == rows["fp_params"].sum(), m
            assert rep.bops == rows["bops"].sum(), m
            assert rep.flops == rows["flops"].sum(), m
            assert rep.ops == pytest.approx(rows["ops"].sum(), rel=1e-12), m
            assert rep.ops == pytest.approx(rep.bops / 64 + rep.flops, rel=1e-12)
            assert rep.params_equiv == pytest.approx(rep.binary_params / 32 + rep.fp_params)
            assert rep.bits == rep.binary_params + 32 * rep.fp_params
            assert rep.bytes == rep.bits / 8


def test_params_match_the_model(reports):
    """Every parameter is counted once: binary + FP == the model's parameter count (no double counting)."""
    c = reports["C"]
    for m in METHODS:
        net = build_network(m, NetConfig(in_channels=c, width=D, depth=N))
        rep = reports["by_method"][m][SIZES[0]]
        assert rep.binary_params + rep.fp_params == sum(p.numel() for p in net.parameters()), m


def test_fp_network_has_no_binary_cost(reports):
    for rep in reports["by_method"]["fp"].values():
        assert rep.binary_params == 0
        assert rep.bops == 0
        assert (rep.rows["kind"] != "binary_conv").all()


@pytest.mark.parametrize("method", BINARY)
def test_binary_bops_and_fp_convs_analytic(reports, method):
    c = reports["C"]
    for (h, w), rep in reports["by_method"][method].items():
        assert rep.bops == N * h * w * D * D * 9, (method, h, w)
        assert rep.binary_params == N * D * D * 9, method
        fp_convs = rep.rows[rep.rows["kind"] == "fp_conv"]
        first, last = (c + 1) * D * 9 * h * w, D * c * 9 * h * w
        assert (fp_convs["macs"] == first).sum() >= 1, (method, fp_convs)
        assert (fp_convs["macs"] == last).sum() >= 1, (method, fp_convs)
        assert rep.flops >= first + last
        # the binary network is cheaper than its FP twin in both storage and operations
        fp_rep = reports["by_method"]["fp"][(h, w)]
        assert rep.params_equiv < fp_rep.fp_params
        assert rep.ops < fp_rep.ops


def test_ops_scale_with_pixels(reports):
    """Fully convolutional networks: OPs(256x256) / OPs(64x64) == 16 (global pooling / MLP rows break exactness)."""
    for m, by_size in reports["by_method"].items():
        small, big = by_size[(64, 64)], by_size[(256, 256)]
        global_rows = small.rows["type"].str.contains("Adaptive|Linear", regex=True).any()
        assert big.ops / small.ops == pytest.approx(16, rel=1e-2 if global_rows else 1e-9), m
        assert big.binary_params == small.binary_params and big.fp_params == small.fp_params


def test_cost_table_columns_and_rows():
    nets = {m: build_network(m, NetConfig(in_channels=3, width=8, depth=2)) for m in ("fp", "bnn")}
    df = cost_table(nets, 3, sizes=((16, 16), (32, 32)))
    assert list(df.columns) == list(TABLE_COLUMNS)
    assert len(df) == 4
    assert list(df["size"]) == ["16x16", "32x32", "16x16", "32x32"]
    assert set(df["method"]) == {"fp", "bnn"}


def test_count_cost_keeps_training_mode_and_bn_stats():
    net = build_network("bnn", NetConfig(in_channels=3, width=8, depth=2)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    count_cost(net, 3, 16, 16)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Bin(nn.Conv2d):
    """A stand-in binary conv following the contract (alpha * sign(W)); only for the hand-checked counts below."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1, bias=False)
        self.act = nn.Hardtanh()

    def weight_sign_and_scale(self):
        sign = torch.where(self.weight >= 0, 1.0, -1.0)
        return sign, self.weight.abs().mean(dim=(1, 2, 3), keepdim=True)

    def binary_weight(self):
        s, a = self.weight_sign_and_scale()
        return a * s

    def forward(self, x):
        return nn.functional.conv2d(self.act(x), self.binary_weight(), None, self.stride, self.padding)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(4, 8, 3, padding=1)
        self.bin = _Bin(8, 8)
        self.bn = nn.BatchNorm2d(8)
        self.tail = nn.Conv2d(8, 3, 3, padding=1, bias=False)
        self.gain = nn.Parameter(torch.ones(1))  # a direct root parameter: counted once, no ops
        self.shared = self.tail  # the same module reachable twice: its params count once

    def forward(self, lms, pan):
        x = self.head(torch.cat([lms, pan], 1))
        return self.tail(self.bn(self.bin(x)) + x) * self.gain + lms


def test_hand_counted_toy():
    rep = count_cost(_Toy(), 3, 10, 10)
    px = 100
    assert rep.binary_params == 8 * 8 * 9
    assert rep.fp_params == (4 * 8 * 9 + 8) + 16 + 8 * 3 * 9 + 1
    assert rep.bops == px * 8 * 8 * 9
    head = 4 * 8 * 9 * px + 8 * px  # MACs + bias
    bin_scale = 8 * px  # alpha per output element
    act = 8 * px  # hardtanh, 1 per element
    bn = 8 * px
    tail = 8 * 3 * 9 * px
    functional = 8 * px + 3 * px + 3 * px  # root forward: + x, * gain, + lms (cat is free)
    assert rep.flops == head + bin_scale + act + bn + tail + functional
    kinds = dict(zip(rep.rows["name"], rep.rows["kind"], strict=True))
    assert kinds["bin"] == "binary_conv" and kinds["head"] == "fp_conv" and kinds["bn"] == "norm"
    assert kinds["bin.act"] == "activation" and kinds["<root>"] == "functional"
    root = rep.rows.set_index("name").loc["<root>"]
    assert root["flops"] == functional and root["fp_params"] == 1
    assert rep.ops == rep.bops / 64 + rep.flops


def test_counting_does_not_import_the_compiler():
    """A dispatch mode's first call used to import torch._dynamo (~3 s of every network evaluate stage)."""
    import subprocess
    import sys

    code = ("import sys\nfrom bnnpan.eval.cost import count_cost\n"
            "from bnnpan.models.networks import NetConfig, build_network\n"
            "net = build_network('bbcu', NetConfig(in_channels=3, width=8, depth=2, ratio=2, extra={}))\n"
            "rep = count_cost(net, 3, 64, 64)\n"
            "assert 'torch._dynamo' not in sys.modules, 'compiler imported'\n"
            "assert rep.bops > 0 and rep.flops > 0\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
