"""shardline.quant: the stored int8/int4 format, its checks, and QLinear's kernels against plain torch."""
import pytest
import torch
import torch.nn.functional as F

from shardline import quant
from shardline.quant import QLinear, check_parts, dequantize, quantize, suffixes

# [out, in]: small, a row count that is no multiple of the kernel's 64-row blocks, and real shapes
SHAPES = [(64, 64), (100, 96), (576, 1536), (1000, 256)]
CASES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def weight(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5
    w[0, :5] = 0.3  # a few outliers, like real checkpoints have
    return w


def fits(shape, scheme, g):
    return scheme == "int8" or shape[1] % g == 0


# every (shape, scheme, group) the format admits
COMBOS = [(shape, scheme, g) for shape in SHAPES for scheme, g in CASES if fits(shape, scheme, g)]


@pytest.mark.parametrize("shape,scheme,g", COMBOS)
def test_round_trip_error_is_bounded(shape, scheme, g):
    w = weight(*shape)
    parts = quantize(w, scheme, g)
    d = dequantize(parts, scheme)
    assert d.shape == w.shape and d.dtype == torch.float32
    if scheme == "int8":
        # symmetric per row: error at most half a step of absmax/127 (plus float rounding)
        step = w.abs().amax(dim=1, keepdim=True) / 127
        assert ((d - w).abs() <= step * 0.5 + 1e-6).all()
    else:
        # per group: half a step of the range (which holds 0) / 15, plus the bf16 rounding of the scale
        wg, dg = w.reshape(shape[0], -1, g), d.reshape(shape[0], -1, g)
        rng = wg.amax(dim=2, keepdim=True).clamp(min=0) - wg.amin(dim=2, keepdim=True).clamp(max=0)
        assert ((dg - wg).abs() <= rng / 15 * 0.5 + rng * 0.02 + 1e-6).all()
    assert quantize(w, scheme, g).keys() == parts.keys()
    for k, v in quantize(w, scheme, g).items():  # deterministic
        assert torch.equal(v, parts[k])


def test_constant_and_zero_rows_survive():
    w = torch.zeros(64, 64)
    w[1] = 0.25
    for scheme, g in CASES[:2]:
        d = dequantize(quantize(w, scheme, g), scheme)
        assert torch.allclose(d, w, atol=1e-3), scheme


def reference(x, parts, scheme, bias, act_dtype):
    """The same maths in plain torch: activations rounded to the kernel's dtype, the weight the kernel
    holds for that dtype."""
    return F.linear(x.to(act_dtype).float(), dequantize(parts, scheme, act_dtype), bias)


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("shape,scheme,g", COMBOS)
def test_qlinear_matches_reference(shape, scheme, g, rows, act):
    if act == torch.float32 and shape == (576, 1536) and rows == 16 and not quant.default_act_dtype() == act:
        pytest.skip("the fp32 path is the scalar fallback on this CPU: slow and covered by the small shapes")
    if act == torch.bfloat16 and scheme == "int4" and quant.default_act_dtype() == torch.float32:
        # aarch64 (tests/test_aarch64.py): the stages feed the kernel float32 there, and its bf16 path
        # rounds otherwise than x86's (1e-2 off this reference, matching no simple rounding of it)
        pytest.skip("int4 with bf16 activations is x86's path; this CPU's stages use float32")
    w = weight(*shape)
    bias = torch.randn(shape[0]) * 0.1
    parts = quantize(w, scheme, g)
    ql = QLinear.from_parts(parts, scheme, bias, act_dtype=act)
    assert (ql.out_features, ql.in_features) == shape
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1))
    y = ql(x)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
    ref = reference(x, parts, scheme, bias, act)
    if act == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:  # the kernel accumulates in fp32 and rounds its output to bf16 (8 significant bits)
        tol = (ref - (bias if bias is not None else 0)).abs() * 2 ** -8 + 1e-4
        assert ((y - ref).abs() <= tol).all(), float((y - ref).abs().max())
    assert QLinear.from_parts(parts, scheme, act_dtype=act)(x[:0]).shape == (0, shape[0])


@pytest.mark.parametrize("scheme,g", CASES)
def test_default_kernel_path_and_leading_dims(scheme, g):
    w = weight(128, 256)
    parts = quantize(w, scheme, g)
    ql = QLinear.from_parts(parts, scheme)
    assert ql.act_dtype == quant.default_act_dtype()
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(ql(x), ql(x.reshape(6, 256)).reshape(2, 3, 128))
    with pytest.raises(ValueError, match="features"):
        ql(torch.randn(2, 255))


@pytest.mark.parametrize("shape,scheme,g", [c for c in COMBOS if c[0] in ((100, 96), (1000, 256))])
def test_rows_equal_dequantized_rows(shape, scheme, g):
    parts = quantize(weight(*shape), scheme, g)
    ids = torch.tensor([0, 1, 63, 64, 65, shape[0] - 1, 7, 7])
    for act in (torch.bfloat16, torch.float32):
        d = dequantize(parts, scheme, act)
        ql = QLinear.from_parts(parts, scheme, act_dtype=act)
        assert torch.equal(ql.rows(ids), d[ids])
        assert ql.rows(torch.tensor([], dtype=torch.long)).shape == (0, shape[1])
        with pytest.raises(IndexError):
            ql.rows(torch.tensor([shape[0]]))


def test_int4_layout_is_known_here():
    """rows() reads codes straight from the kernel's packed buffer: the layout must be recognised
    (otherwise QLinear keeps a second copy of the codes)."""
    assert quant._int4_layout() is not None


def test_int4_packing_is_half_a_byte_per_weight():
    out_f, in_f, g = 256, 512, 32
    parts = quantize(weight(out_f, in_f), "int4", g)
    assert parts["qweight"].dtype == torch.uint8 and parts["qweight"].shape == (out_f, in_f // 2)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    assert stored == out_f * in_f // 2 + 3 * out_f * in_f // g  # codes + a bf16 scale and a uint8 zero per group
    assert stored / (out_f * in_f * 4) < 0.15
    int8 = quantize(weight(out_f, in_f), "int8")
    assert sum(t.numel() * t.element_size() for t in int8.values()) == out_f * in_f + 4 * out_f


def test_int4_zero_points_are_integers_and_exact_in_fp32():
    """W = (q - z) * scale with z an integer in 0..15; the fp32 kernel's offset (8 - z) * scale is
    exact, the bf16 one within 2^-8 of it (bf16 keeps 8 significant bits)."""
    w = weight(256, 512)
    w[3] = w[3].abs() + 0.01    # an all-positive row and an all-negative one: the range still holds 0
    w[4] = -w[4].abs() - 0.01
    parts = quantize(w, "int4", 32)
    z = parts["zeros"]
    assert z.dtype == torch.uint8 and int(z.max()) <= 15
    step = parts["scales"].float().repeat_interleave(32, dim=1)
    assert ((dequantize(parts, "int4") - w)[3:5].abs() <= step[3:5] * 0.5 + 1e-6).all()   # neither end clipped
    q = torch.stack((parts["qweight"] & 0xF, parts["qweight"] >> 4), dim=-1).reshape(256, 512).float()
    exact = ((q.reshape(256, 16, 32) - z.float()[..., None]) * parts["scales"].float()[..., None]).reshape(256, 512)
    assert torch.equal(dequantize(parts, "int4"), exact)
    bf16 = dequantize(parts, "int4", torch.bfloat16)
    offset = ((8 - z.float()) * parts["scales"].float()).abs().repeat_interleave(32, dim=1)
    assert ((bf16 - exact).abs() <= offset * 2 ** -8 + 1e-7).all() and not torch.equal(bf16, exact)
    parts["zeros"] = torch.full_like(z, 16)
    with pytest.raises(ValueError, match=r"w\.zeros holds 16.*0\.\.15"):
        check_parts("w", parts, "int4")


def test_int4_shards_with_bf16_offsets_still_load():
    """Shards written before the integer zero points store the kernel's offset in bf16: they load and
    compute (q - 8) * scale + offset as they did."""
    w = weight(128, 256)
    parts = quantize(w, "int4", 32)
    old = dict(parts, zeros=((8.0 - parts["zeros"].float()) * parts["scales"].float()).to(torch.bfloat16))
    check_parts("w", old, "int4")
    assert torch.equal(dequantize(old, "int4"), dequantize(parts, "int4", torch.bfloat16))
    x = torch.randn(4, 256)
    for act in (torch.bfloat16, torch.float32):
        ql = QLinear.from_parts(old, "int4", act_dtype=act)
        torch.testing.assert_close(ql(x), F.linear(x.to(act).float(), dequantize(old, "int4")), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("scheme,g", CASES[:2])
def test_qlinear_holds_no_float_weight(scheme, g):
    out_f, in_f = 512, 1024
    parts = quantize(weight(out_f, in_f), scheme, g)
    for act in (torch.bfloat16, torch.float32):
        ql = QLinear.from_parts(parts, scheme, torch.zeros(out_f), act_dtype=act)
        held = ql.tensors()
        big = {k: t for k, t in held.items() if t.numel() >= out_f * in_f // 8}
        assert big and all(not t.is_floating_point() for t in big.values()), {k: t.dtype for k, t in held.items()}
        assert ql.nbytes == sum(t.numel() * t.element_size() for t in held.values())
        per_weight = 1.0 if scheme == "int8" else 0.5
        overhead = 4 * out_f * 2 if scheme == "int8" else 4 * 2 * out_f * in_f // g + 64 * in_f
        assert ql.nbytes <= out_f * in_f * per_weight + overhead + 4 * out_f


def test_suffixes():
    assert suffixes("int8") == ("qweight", "scales")
    assert suffixes("int4") == ("qweight", "scales", "zeros")
    with pytest.raises(ValueError, match="int3.*int8, int4"):
        suffixes("int3")


def _broken(scheme, how):
    parts = quantize(weight(64, 128), scheme, 32 if scheme == "int4" else None)
    if how == "missing scales":
        del parts["scales"]
    elif how == "missing zeros":
        del parts["zeros"]
    elif how == "float qweight":
        parts["qweight"] = parts["qweight"].float()
    elif how == "fp16 scales":
        parts["scales"] = parts["scales"].half()
    elif how == "short scales":
        parts["scales"] = parts["scales"][:-1]
    elif how == "odd group":
        parts["scales"] = parts["scales"][:, :3]
        parts["zeros"] = parts["zeros"][:, :3]
    return parts


@pytest.mark.parametrize("scheme,how,part", [
    ("int8", "missing scales", "scales"),
    ("int8", "float qweight", "qweight"),
    ("int8", "fp16 scales", "scales"),
    ("int8", "short scales", "scales"),
    ("int4", "missing scales", "scales"),
    ("int4", "missing zeros", "zeros"),
    ("int4", "float qweight", "qweight"),
    ("int4", "fp16 scales", "scales"),
    ("int4", "short scales", "scales"),
    ("int4", "odd group", "scales"),
])
def test_check_parts_names_the_bad_tensor(scheme, how, part):
    parts = _broken(scheme, how)
    name = "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=rf"{name}\.{part}\b.*--quantize {scheme}"):
        check_parts(name, parts, scheme)
    with pytest.raises(ValueError, match=rf"{name}\.{part}\b"):
        QLinear.from_parts(parts, scheme, name=name)


def test_check_parts_accepts_what_quantize_writes_and_refuses_unknown_schemes():
    for scheme, g in CASES:
        check_parts("w", quantize(weight(64, 256), scheme, g), scheme)
    with pytest.raises(ValueError, match="unknown quantization scheme 'q4_0'"):
        check_parts("w", {}, "q4_0")
    with pytest.raises(ValueError, match="int8, int4"):
        quantize(weight(64, 64), "fp8")


@pytest.mark.parametrize("bad,msg", [
    (lambda: quantize(torch.randn(64, 40), "int8"), "multiple of 32"),
    (lambda: quantize(torch.randn(64, 96), "int4", 64), "does not divide"),
    (lambda: quantize(torch.randn(64, 64), "int4", 16), "group size 16"),
    (lambda: quantize(torch.randn(64, 64), "int8", 32), "no group size"),
    (lambda: quantize(torch.randn(64), "int8"), "2-D float"),
])
def test_quantize_refuses_what_the_kernels_cannot_take(bad, msg):
    with pytest.raises(ValueError, match=msg):
        bad()


def test_quantizable():
    assert quant.quantizable((10, 64), "int8") and not quant.quantizable((10, 40), "int8")
    assert quant.quantizable((10, 64), "int4", 32) and not quant.quantizable((10, 96), "int4", 64)
    assert not quant.quantizable((64,), "int8")


def test_packing_in_chunks_equals_packing_whole(monkeypatch):
    """from_parts packs int4 a few hundred rows at a time (bounded int32 temporaries): the result
    must be the kernel's own packing of the whole matrix."""
    parts = quantize(weight(1000, 256), "int4", 32)
    monkeypatch.setattr(quant, "_ROWS_PER_CHUNK", 128)
    chunked = QLinear.from_parts(parts, "int4", act_dtype=torch.bfloat16)
    monkeypatch.setattr(quant, "_ROWS_PER_CHUNK", 4096)
    whole = QLinear.from_parts(parts, "int4", act_dtype=torch.bfloat16)
    assert torch.equal(chunked.tensors()["packed"], whole.tensors()["packed"])


def test_loading_an_int4_weight_frees_its_stored_codes_at_once():
    """The kernel's packed codes replace the stored ones: linear() drops them from the shard's tensors
    as it builds each layer, so a rank never holds two copies of its codes (its peak RSS is one shard
    plus the runtime)."""
    import gc
    import weakref

    from shardline.models.linear import linear
    parts = quantize(weight(256, 512), "int4", 32)
    t = {f"w.{k}": v for k, v in parts.items()}
    stored = weakref.ref(parts.pop("qweight"))
    ql = linear(t, "w", quant={"scheme": "int4", "group_size": 32})
    gc.collect()
    assert not t and stored() is None
    x = torch.randn(2, 512)
    torch.testing.assert_close(ql(x), QLinear.from_parts(quantize(weight(256, 512), "int4", 32), "int4")(x))


@pytest.mark.parametrize("stored, edge, manifest, error", [
    # (scheme the shard holds, embedding/head?, manifest's quantization, expected error or None)
    ("int8", False, {"scheme": "int8"}, None),
    ("int4", False, {"scheme": "int4", "head": "int8"}, None),
    ("int8", True, {"scheme": "int4", "head": "int8"}, None),          # an int4 split's head stays int8
    ("int8", False, {"scheme": "int4", "head": "int8"}, "is int8 but the manifest says int4 for the blocks"),
    ("int4", True, {"scheme": "int4", "head": "int8"}, "is int4 but the manifest says int8 for the embedding/head"),
    ("int8", True, {"scheme": "int8", "head": "float32"}, "is int8 but the manifest says float32"),
    ("int4-no-zeros", False, {"scheme": "int4", "head": "int8"}, r"w\.zeros is missing"),
])
def test_a_weight_is_read_in_the_scheme_the_manifest_gives_its_role(stored, edge, manifest, error):
    """The blocks take the manifest's scheme, the embedding/head its head scheme; a part missing is named,
    not taken for the other scheme's weight."""
    from shardline.models.linear import linear
    parts = quantize(weight(64, 256), stored.split("-")[0], 32 if stored.startswith("int4") else None)
    if stored.endswith("no-zeros"):
        del parts["zeros"]
    t = {f"w.{k}": v for k, v in parts.items()}
    if error is None:
        assert isinstance(linear(t, "w", quant=manifest, edge=edge), QLinear)
    else:
        with pytest.raises(ValueError, match=error):
            linear(t, "w", quant=manifest, edge=edge)
