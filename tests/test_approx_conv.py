"""Rules for approximate-multiplier convolutions (workers/approx): product tables, quantization,
the exact integer convolution methods against a per-product reference, the module and the
model helpers a layer-sensitivity study uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workers.approx.kernels as kernels_mod
from workers.approx import (
    MULTIPLIERS,
    ApproxConv2d,
    ProductTable,
    approx_conv2d,
    conv_layers,
    direct_conv2d,
    load_table,
    quantize,
    scale_for,
    swap_layer,
    table_by_name,
    trace_macs,
)
from workers.approx.conv import auto_method, output_shape

METHODS = ("auto", "gather", "onehot", "bag_input", "bag_weight")
# (in, out, kernel, stride, padding, groups, dilation, size)
SHAPES = {
    "pointwise": (8, 6, 1, 1, 0, 1, 1, 5),
    "depthwise_3x3": (6, 6, 3, 1, 1, 6, 1, 6),
    "strided_padded_3x3": (5, 4, 3, 2, 1, 1, 1, 7),
    "depthwise_strided": (6, 6, 3, 2, 1, 6, 1, 7),
    "dense_3x3": (7, 5, 3, 1, 1, 1, 1, 6),
    "grouped_3x3": (6, 4, 3, 1, 1, 2, 1, 5),
    "dilated_3x3": (3, 4, 3, 1, 2, 1, 2, 7),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread avoids waiting on a busy second core at every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _operands(shape: str, lo: int = -128, hi: int = 127, batch: int = 2, seed: int = 0):
    cin, cout, k, stride, padding, groups, dilation, size = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(lo, hi + 1, (batch, cin, size, size), generator=g)
    w = torch.randint(lo, hi + 1, (cout, cin // groups, k, k), generator=g)
    return x, w, {"stride": stride, "padding": padding, "groups": groups, "dilation": dilation}


def _user_table(seed: int = 1, signed: bool = True, scale: int = 20000) -> ProductTable:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-scale, scale, (256, 256), generator=g)
    return ProductTable("user", 8, signed, values)


# ---------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("method", (*METHODS, "factors"))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_exact_table_equals_float64_conv_bit_for_bit(shape: str, method: str) -> None:
    x, w, kw = _operands(shape)
    expected = F.conv2d(x.double(), w.double(), **kw).to(torch.int64)
    got = approx_conv2d(x, w, table_by_name("exact"), method=method, **kw)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


TABLES = ("truncated", "truncated6", "mitchell", "drum4", "drum6")


def _sample_outputs(shape: tuple[int, ...], count: int, seed: int = 0) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(torch.randint(0, s, (1,), generator=g)) for s in shape) for _ in range(count)]


@pytest.mark.parametrize("shape", ["pointwise", "strided_padded_3x3", "depthwise_strided", "grouped_3x3"])
@pytest.mark.parametrize("name", TABLES)
def test_builtin_tables_equal_the_per_product_reference(name: str, shape: str) -> None:
    table = table_by_name(name)
    x, w, kw = _operands(shape, seed=3)
    outs = _sample_outputs(output_shape(x.shape, w.shape, kw["stride"], kw["padding"], kw["dilation"]), 12)
    ref = direct_conv2d(x, w, table, outputs=outs, **kw)
    methods = (*METHODS, "factors") if table.factors is not None else METHODS
    for method in methods:
        got = approx_conv2d(x, w, table, method=method, **kw)
        assert [int(got[o]) for o in outs] == ref.tolist(), method


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_user_table_saved_and_loaded_equals_the_reference(tmp_path, suffix: str) -> None:
    table = _user_table()
    path = tmp_path / f"circuit{suffix}"
    if suffix == ".npy":
        np.save(path, table.values.numpy())
    else:
        np.savetxt(path, table.values.numpy(), fmt="%d", delimiter=",")
    loaded = load_table(path, signed=True)
    assert loaded.name == "circuit" and loaded.signed and loaded.bits == 8
    assert torch.equal(loaded.values, table.values)
    for shape in ("dense_3x3", "depthwise_3x3", "strided_padded_3x3"):
        x, w, kw = _operands(shape, seed=5)
        full = direct_conv2d(x, w, loaded, **kw)  # small enough for the whole output
        for method in METHODS:
            assert torch.equal(approx_conv2d(x, w, loaded, method=method, **kw), full), (shape, method)


def test_unsigned_tables_with_unsigned_operands_equal_the_reference() -> None:
    for table in (table_by_name("mitchell", signed=False), _user_table(signed=False)):
        x, w, kw = _operands("strided_padded_3x3", lo=0, hi=255, seed=7)
        ref = direct_conv2d(x, w, table, **kw)
        for method in METHODS:
            assert torch.equal(approx_conv2d(x, w, table, method=method, **kw), ref), method


def test_padding_goes_through_the_table_as_operand_zero() -> None:
    """A user table with table[0, w] != 0: padded taps contribute it, in every method."""
    table = _user_table(seed=2)
    assert int(table.values[0 - table.lo].abs().sum()) > 0
    x, w, kw = _operands("strided_padded_3x3", seed=9)
    ref = direct_conv2d(x, w, table, **kw)
    # the corner output sees padded taps: its value counts table[0, w] for each of them
    corner = sum(
        table.lookup(int(x[0, c, i, j]) if i >= 0 and j >= 0 else 0, int(w[0, c, i + 1, j + 1]))
        for c in range(x.shape[1]) for i in (-1, 0, 1) for j in (-1, 0, 1)
    )
    assert int(ref[0, 0, 0, 0]) == corner
    for method in METHODS:
        assert torch.equal(approx_conv2d(x, w, table, method=method, **kw), ref), method


@pytest.mark.parametrize("magnitude", [2**20, 2**30])
def test_large_table_values_and_small_chunks_stay_exact(monkeypatch, magnitude: int) -> None:
    """Float32 bags split where a sum could pass 2**24; float64 beyond; tiny chunks exercise
    every chunking loop."""
    monkeypatch.setattr(kernels_mod, "CHUNK_ELEMENTS", 64)
    table = _user_table(seed=4, scale=magnitude)
    for shape in ("dense_3x3", "depthwise_strided", "pointwise"):
        x, w, kw = _operands(shape, seed=11)
        ref = direct_conv2d(x, w, table, **kw)
        for method in METHODS:
            assert torch.equal(approx_conv2d(x, w, table, method=method, **kw), ref), (shape, method)


def test_direct_reference_slice_equals_its_full_output() -> None:
    table = table_by_name("mitchell")
    x, w, kw = _operands("grouped_3x3", seed=13)
    full = direct_conv2d(x, w, table, **kw)
    outs = _sample_outputs(tuple(full.shape), 10, seed=1)
    assert direct_conv2d(x, w, table, outputs=outs, **kw).tolist() == [int(full[o]) for o in outs]
    with pytest.raises(ValueError, match="outside the output shape"):
        direct_conv2d(x, w, table, outputs=[(0, 0, 99, 0)], **kw)


def test_auto_runs_one_conv_for_exact_tables_and_the_gather_for_depthwise() -> None:
    x, w, kw = _operands("dense_3x3")
    assert auto_method(x, w, table_by_name("exact"), **kw) == "onehot"  # E = 0: a single conv
    x, w, kw = _operands("depthwise_strided")
    assert auto_method(x, w, table_by_name("mitchell"), **kw) == "gather"
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        approx_conv2d(x, w, table_by_name("exact"), method="fast", **kw)


def test_operands_outside_the_table_are_refused() -> None:
    table = table_by_name("exact", signed=False)
    x, w, kw = _operands("pointwise")  # signed values, negative ones included
    with pytest.raises(ValueError, match="outside the 'exact' table's 0..255"):
        approx_conv2d(x, w, table, **kw)
    with pytest.raises(ValueError, match="integer tensor"):
        approx_conv2d(x.float(), w, table, **kw)


# ---------------------------------------------------------------------------------------------
# The built-in multipliers


def test_builtins_differ_from_exact_where_expected() -> None:
    u = {name: table_by_name(name, signed=False) for name in ("truncated", "mitchell", "drum4", "drum6")}
    # truncated8: partial-product bits below column 8 dropped
    assert u["truncated"].lookup(255, 255) == 255 * 255 - 1793  # sum_{i+j<8} 2**(i+j) = 1793
    assert u["truncated"].lookup(16, 16) == 256  # only bit 4 x bit 4: column 8, kept
    assert u["truncated"].lookup(3, 3) == 0  # every partial product below column 8
    assert table_by_name("truncated6", signed=False).lookup(3, 3) == 0
    assert table_by_name("truncated6", signed=False).lookup(8, 8) == 64
    # mitchell: 2**(ka+kb) (1 + fa + fb), or 2**(ka+kb+1) (fa + fb) when fa + fb >= 1
    assert u["mitchell"].lookup(3, 3) == 8
    assert u["mitchell"].lookup(5, 5) == 24
    assert u["mitchell"].lookup(64, 8) == 512  # powers of two are exact
    assert u["mitchell"].lookup(0, 77) == 0
    # drum4: 255 -> 240 (1111 kept), 128 -> 144 (1000 -> 1001), 200 -> 208; 4-bit operands exact
    assert u["drum4"].lookup(255, 255) == 240 * 240
    assert u["drum4"].lookup(128, 128) == 144 * 144
    assert u["drum4"].lookup(15, 200) == 15 * 208
    assert u["drum4"].lookup(13, 11) == 143
    # signed: the unsigned approximation of the magnitudes, with the sign restored
    s = table_by_name("mitchell")
    assert s.lookup(-5, 5) == -24 and s.lookup(-5, -5) == 24 and s.lookup(-128, 1) == -128
    ops = torch.arange(256, dtype=torch.float64)
    exact = ops[:, None] * ops[None, :]
    for name, table in u.items():
        diff = table.values.double() - exact
        bias = float(diff.sum() / exact.sum())
        if name in ("truncated", "mitchell"):
            assert float(diff.max()) == 0 and bias < -0.02, name  # never above, low on average
        else:
            assert float(diff.max()) > 0 > float(diff.min()) and abs(bias) < 0.01, name  # unbiased


def test_registry_and_names() -> None:
    assert set(MULTIPLIERS.names()) == {"exact", "truncated", "mitchell", "drum4", "drum6"}
    for name in MULTIPLIERS.names():
        t = MULTIPLIERS.get(name)(bits=8, signed=True)
        assert (t.lo, t.hi, t.values.shape, t.values.dtype) == (-128, 127, (256, 256), torch.int64)
        assert t.values[0 - t.lo].eq(0).all() and t.values[:, 0 - t.lo].eq(0).all()
    assert (table_by_name("exact", signed=False).lo, table_by_name("exact", signed=False).hi) == (0, 255)
    assert table_by_name("truncated6").name == "truncated6"
    assert table_by_name("drum5").name == "drum5"
    with pytest.raises(ValueError, match="unknown multiplier 'nope'; valid: drum4, drum6, exact"):
        table_by_name("nope")


# ---------------------------------------------------------------------------------------------
# User tables


def test_load_table_errors_are_one_line_and_name_the_path(tmp_path) -> None:
    cases = {}
    p = tmp_path / "short.npy"
    np.save(p, np.zeros((255, 256), dtype=np.int64))
    cases[p] = "shape 255x256"
    p = tmp_path / "half.npy"
    a = np.zeros((256, 256))
    a[3, 4] = 0.5
    np.save(p, a)
    cases[p] = "non-integer value 0.5 at row 3, column 4"
    p = tmp_path / "nan.csv"
    a = np.zeros((256, 256))
    a[0, 0] = np.nan
    np.savetxt(p, a, delimiter=",")
    cases[p] = "1 NaN values"
    p = tmp_path / "words.csv"
    p.write_text("a,b\n1,2\n")
    cases[p] = "cannot be read"
    p = tmp_path / "strings.npy"
    np.save(p, np.array([["x"] * 4] * 4))
    cases[p] = "is not an integer or float type"
    cases[tmp_path / "missing.npy"] = "no such file"
    for path, what in cases.items():
        with pytest.raises(ValueError) as err:
            load_table(path)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and what in msg, msg
        assert "expected a square 2**bits x 2**bits table" in msg and "256x256" in msg
    with pytest.raises(ValueError, match="missing.csv: no such file"):
        table_by_name(str(tmp_path / "missing.csv"))


def test_load_table_accepts_whole_floats_and_infers_signedness(tmp_path) -> None:
    unsigned = table_by_name("mitchell", signed=False)
    signed = table_by_name("mitchell")
    np.save(tmp_path / "u.npy", unsigned.values.numpy().astype(np.float64))
    np.save(tmp_path / "s.npy", signed.values.numpy())
    # two's-complement order: row i is operand i for i < 128, i - 256 above
    np.save(tmp_path / "twos.npy", torch.roll(signed.values, (128, 128), (0, 1)).numpy())
    u = load_table(tmp_path / "u.npy")
    assert not u.signed and torch.equal(u.values, unsigned.values)
    for name in ("s.npy", "twos.npy"):
        s = load_table(tmp_path / name)
        assert s.signed and torch.equal(s.values, signed.values), name
        assert torch.equal(load_table(tmp_path / name, signed=True).values, signed.values)
    forced = load_table(tmp_path / "s.npy", signed=False)
    assert not forced.signed and torch.equal(forced.values, signed.values)
    assert table_by_name(str(tmp_path / "u.npy")).name == "u"


# ---------------------------------------------------------------------------------------------
# Quantization


def test_quantize_rounds_clamps_and_counts_saturations_exactly() -> None:
    x = torch.tensor([0.0, 0.04, 0.06, -0.06, 1.27, 1.28, -1.28, -1.3, 5.0, -5.0])
    q, sat = quantize(x, 100.0, -128, 127)
    assert q.dtype == torch.int64
    assert q.tolist() == [0, 4, 6, -6, 127, 127, -128, -128, 127, -128]
    assert int(sat) == 4  # 1.28 -> 128, -1.3 -> -130, 5.0, -5.0
    q, sat = quantize(x, 100.0, 0, 255)
    assert q.tolist() == [0, 4, 6, 0, 127, 128, 0, 0, 255, 0] and int(sat) == 5
    with pytest.raises(ValueError, match="scale"):
        quantize(x, 0.0, -128, 127)


def test_scale_for_maps_the_observed_range() -> None:
    v = torch.tensor([-2.0, 0.5, 1.0, 4.0])
    assert scale_for(v, -128, 127) == pytest.approx(127 / 4)
    assert scale_for([v, torch.tensor([-8.0])], -128, 127) == pytest.approx(127 / 8)
    assert scale_for(v, 0, 255) == pytest.approx(255 / 4)
    many = torch.cat([torch.ones(9999), torch.tensor([100.0])])
    assert scale_for(many, -128, 127, "percentile", 99.9) == pytest.approx(127.0)
    assert scale_for(torch.zeros(3), -128, 127) == 1.0
    with pytest.raises(ValueError, match="method"):
        scale_for(v, -128, 127, "mean")


# ---------------------------------------------------------------------------------------------
# The module and the model helpers


def test_approx_conv2d_module_with_exact_table_is_within_the_quantization_bound() -> None:
    """y - y_float = sum over the K products of (x e_w / s_w + w e_x / s_x + e_x e_w / (s_x s_w))
    with |e| <= 1/2, so |y - y_float| <= K (max|x| / (2 s_w) + max|w| / (2 s_x) + 1 / (4 s_x s_w))
    when nothing saturates."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1)
    x = torch.rand(2, 6, 9, 9) * 2 - 1
    table = table_by_name("exact")
    sx = scale_for(x, table.lo, table.hi)
    sw = scale_for(conv.weight, table.lo, table.hi)
    m = ApproxConv2d(conv, table, sx, sw)
    y, y_float = m(x), conv(x).detach()
    k = 6 * 9
    bound = k * (x.abs().max() / (2 * sw) + conv.weight.abs().max() / (2 * sx) + 1 / (4 * sx * sw))
    err = (y - y_float).abs().max()
    assert err <= bound + 1e-5 and err > 0
    assert m.saturated == {"input": 0, "weight": 0}
    assert m.total == {"input": x.numel(), "weight": conv.weight.numel()}
    assert m.weight is conv.weight and set(m.state_dict()) == set(conv.state_dict())


def test_approx_conv2d_module_counts_saturations() -> None:
    conv = nn.Conv2d(2, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.5)
        conv.weight[0, 0] = 3.0  # 3.0 * 100 = 300 > 127
    m = ApproxConv2d(conv, table_by_name("mitchell"), 10.0, 100.0)
    x = torch.tensor([[[[1.0, 20.0]], [[-13.0, 0.0]]]])  # 200 and -130 saturate
    y = m(x)
    assert y.shape == (1, 3, 1, 2) and y.dtype == x.dtype
    assert m.saturated == {"input": 2, "weight": 1} and m.total == {"input": 4, "weight": 6}
    m(x)
    assert m.saturated == {"input": 4, "weight": 1} and m.total == {"input": 8, "weight": 6}
    m.reset_counts()
    assert m.saturated == {"input": 0, "weight": 0}


def test_swap_layer_replaces_and_restores_the_module() -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), nn.Conv2d(4, 2, 1))
    original = model[0][0]
    x = torch.rand(1, 3, 6, 6)
    before = model(x)
    replacement = ApproxConv2d(original, table_by_name("drum6"), 100.0, 100.0)
    with swap_layer(model, "0.0", replacement) as old:
        assert old is original and model[0][0] is replacement
        assert not torch.equal(model(x), before)
    assert model[0][0] is original and torch.equal(model(x), before)
    with pytest.raises(RuntimeError), swap_layer(model, "1", nn.Identity()):
        raise RuntimeError
    assert isinstance(model[1], nn.Conv2d)
    with pytest.raises(ValueError, match="no module 'nope.0'"):
        with swap_layer(model, "nope.0", nn.Identity()):
            pass


def test_conv_layers_of_mobilenetv2_depth() -> None:
    """52 encoder convs and the decoder's 14. The source counted 35 pointwise + 17 depthwise:
    its per-layer classes were picked by groups, so features.0 (3x3, stride 2, 3 -> 32, groups 1)
    went with the pointwise (groups = 1) ones. By kernel it is the one dense conv: 34 + 17 + 1."""
    import workers.models  # noqa: F401  (registers the models)
    from workers.models.registry import build_model

    model = build_model("mobilenetv2_depth", "full")
    layers = conv_layers(model, (224, 224))
    enc = [layer for layer in layers if layer.part == "encoder"]
    dec = [layer for layer in layers if layer.part == "decoder"]
    kinds = lambda ls: {k: sum(1 for la in ls if la.kind == k)  # noqa: E731
                        for k in ("pointwise", "depthwise", "dense")}
    assert len(enc) == 52 and kinds(enc) == {"pointwise": 34, "depthwise": 17, "dense": 1}
    assert len(dec) == 14 and kinds(dec) == {"pointwise": 1, "depthwise": 0, "dense": 13}
    by_name = {layer.name: layer for layer in layers}
    first = by_name["encoder.features.0.0"]
    assert (first.kind, first.kernel_size, first.stride, first.groups) == ("dense", (3, 3), (2, 2), 1)
    assert by_name["encoder.features.1.conv.0.0"].kind == "depthwise"
    assert by_name["encoder.features.2.conv.0.0"].macs == 16 * 96 * 112 * 112
    assert by_name["decoder.up0.convB"].weight_shape == (384, 384, 3, 3)
    assert by_name["decoder.conv3"].macs == 48 * 9 * 112 * 112
    assert [layer.name for layer in dec][:3] == ["decoder.conv2", "decoder.up0.convA", "decoder.up0.convB"]
    assert sum(layer.macs for layer in layers) == 2_645_322_624
    assert trace_macs(model, (1, 3, 64, 64))["decoder.conv3"] == 48 * 9 * 32 * 32
    assert model.training  # tracing ran in eval mode and gave the mode back
