"""Quantized weights: the stored format (int8, int4) and the matmul a stage runs on it.

Stored format (plain tensors, saved in the shard's safetensors under f"{name}.{suffix}"):

  int8  qweight int8 [out, in]          symmetric per output channel: W ~= qweight * scales[:, None]
        scales  float32 [out]
  int4  qweight uint8 [out, in/2]       two 4-bit codes q in 0..15 per byte, column 2j in the low
                                        nibble, 2j+1 in the high one (0.5 byte per weight)
        scales  bfloat16 [out, in/g]    group-wise along `in` (g = group size, 32 by default),
        zeros   uint8 [out, in/g]       asymmetric with an integer zero point z in 0..15, as GPTQ
                                        and AWQ store it: W ~= (q - z) * scale

A bf16 scale and a one-byte zero per 32 weights: 0.594 byte per weight, 0.148x fp32 (a bf16 zero,
as shards written before 2026-11-29 hold and still load, costs a byte more per group). The scale is
rounded to bf16 before the codes are chosen, so the codes fit the stored scale.

PyTorch's int4 kernel computes (q - 8) * scale + offset, so loading sets offset = (8 - z) * scale:
exact in fp32 (aarch64), rounded to bf16 on x86-64, whose kernel takes bf16 (an error of at most
scale / 32, a sixteenth of the codes' own rounding error of scale / 2). A bf16 offset (a GGUF file's
Q4_1/Q4_K codes kept as they are, or a shard from before 2026-11-29) is rounded on every CPU: an error
of up to |offset| / 256, which exceeds scale / 32 only for a group far from zero against its spread,
and is still far below requantizing such a group. dequantize(..., act_dtype)
gives the weight each kernel computes with, so the reference maths is exactly the kernels'.

Kernels (QLinear): PyTorch's weight-only CPU kernels, aten._weight_int8pack_mm and
aten._weight_int4pack_mm_for_cpu. They never expand the weight to float: each dequantizes a few
codes into vector registers and multiplies there. Which activation dtype they are fed depends on
the CPU, because the kernels vectorize different dtypes (read from aten/src/ATen/native/cpu/
int8mm_kernel.cpp and int4mm_kernel.cpp, torch 2.13):

  x86-64 (AVX2 / AVX-512)  vectorized for bfloat16 activations only; fp32 runs a scalar loop
                           (10-30x slower than fp32 F.linear). So x is rounded to bf16, the kernel
                           accumulates in fp32 and returns bf16, and the result goes back to fp32.
                           int8 is fed unit scales and scaled in fp32 afterwards, so the fp32 scales
                           are used as stored.
  aarch64 (NEON)           vectorized (tinygemm_kernel_ with vfmaq_f32) for fp32, fp16 and bf16
                           alike: fp32 activations, no rounding at all.
  other                    fp32 (the scalar fallback: correct, slow).

bench/kernels.py measures these against fp32 F.linear, torch.ao's dynamic int8 (fbgemm/qnnpack)
and torchao; bench/accuracy.py measures what the bf16 rounding costs.
"""
from __future__ import annotations

import functools
import platform
import warnings

import torch

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32
GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
IN_MULTIPLE = 32  # the kernels' vector loops have no tail: `in` must be a multiple of this
_ROWS_PER_CHUNK = 512  # quantize / pack this many output rows at a time (bounds temporaries)
_N_PAD = 64  # int4: the kernel takes `out` in blocks of 16..64 rows; pad to whole 64-row blocks

_SUFFIXES = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "zeros")}


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")


def suffixes(scheme: str) -> tuple[str, ...]:
    """The tensor suffixes a quantized weight of this scheme stores (f"{name}.{suffix}")."""
    _check_scheme(scheme)
    return _SUFFIXES[scheme]


def quantizable(shape, scheme: str, group_size: int | None = None) -> bool:
    """Whether a weight of this [out, in] shape can be stored in this scheme (else keep it float)."""
    _check_scheme(scheme)
    if len(shape) != 2 or shape[1] % IN_MULTIPLE:
        return False
    return scheme == "int8" or shape[1] % (group_size or DEFAULT_GROUP_SIZE) == 0


# --------------------------------------------------------------------------------------------------
# quantize / dequantize (reference maths)


def quantize(w: torch.Tensor, scheme: str, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """Quantize a float weight [out, in] (nn.Linear layout). Deterministic; works in row chunks so
    the float temporaries stay small next to w."""
    _check_scheme(scheme)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize wants a 2-D float weight [out, in], got {tuple(w.shape)} {w.dtype}")
    out_f, in_f = w.shape
    if in_f % IN_MULTIPLE:
        raise ValueError(f"{scheme} needs in_features to be a multiple of {IN_MULTIPLE} (the kernels' "
                         f"vector width), got {in_f}: keep this tensor in float")
    if scheme == "int8":
        if group_size is not None:
            raise ValueError("int8 is per output channel: it takes no group size")
        q = torch.empty(out_f, in_f, dtype=torch.int8)
        scales = torch.empty(out_f, dtype=torch.float32)
        for r in range(0, out_f, _ROWS_PER_CHUNK):
            wc = w[r:r + _ROWS_PER_CHUNK].float()
            s = wc.abs().amax(dim=1) / 127.0
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale, codes 0
            q[r:r + _ROWS_PER_CHUNK] = torch.round(wc / s[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[r:r + _ROWS_PER_CHUNK] = s
        return {"qweight": q, "scales": scales}

    g = DEFAULT_GROUP_SIZE if group_size is None else int(group_size)
    if g not in GROUP_SIZES:
        raise ValueError(f"int4 group size {g} not supported: use one of {GROUP_SIZES}")
    if in_f % g:
        raise ValueError(f"int4 group size {g} does not divide in_features {in_f}")
    ng = in_f // g
    qweight = torch.empty(out_f, in_f // 2, dtype=torch.uint8)
    scales = torch.empty(out_f, ng, dtype=torch.bfloat16)
    zeros = torch.empty(out_f, ng, dtype=torch.uint8)
    for r in range(0, out_f, _ROWS_PER_CHUNK):
        wc = w[r:r + _ROWS_PER_CHUNK].float().reshape(-1, ng, g)
        q, s, z = _int4_group_fit(wc)
        q = q.reshape(q.shape[0], in_f)
        qweight[r:r + _ROWS_PER_CHUNK] = q[:, 0::2] | (q[:, 1::2] << 4)
        scales[r:r + _ROWS_PER_CHUNK] = s.to(torch.bfloat16)
        zeros[r:r + _ROWS_PER_CHUNK] = z.to(torch.uint8)
    return {"qweight": qweight, "scales": scales, "zeros": zeros}


# Clipping grid of the int4 fit: each group's range [lo, hi] may shrink at either end and the pair
# with the least squared error wins (as llama.cpp's Q4_K and AWQ search clipping). Measured on an
# earlier, more sensitive fit of bench/accuracy.py's tiny Llama (lr 1e-2, scored at full length): the
# grid (1, .95, .9, .85) x the same lifted int4 g32 top-1 agreement from 81.8 % to 84.4 %, but makes
# quantizing 16x slower (50 s for one 2048x8192 matrix on
# the busy 2-core dev machine), so the default is plain min/max. Set it to the grid to trade time.
_CLIP = (1.0,)


def _int4_group_fit(wc: torch.Tensor):
    """wc [rows, groups, g] -> codes [rows, groups, g], scale (float32, rounded to bf16) and integer
    zero point [rows, groups]: W ~= (q - z) * s. The range always holds 0 (GPTQ's rule), so the zero
    point lands in 0..15 and an all-positive or all-negative group is not clipped at its far end.
    Rounding the zero point to an integer shifts the grid by up to half a step, clipping one end: each
    group takes the best (least squared error) of the zero point rounded down or up, each with the
    min/max scale or the least scale that covers the range from that zero point."""
    lo0, hi0 = wc.amin(dim=2).clamp(max=0), wc.amax(dim=2).clamp(min=0)
    best = None

    def bf16(x):
        x = x.to(torch.bfloat16).float()
        return torch.where(x > 0, x, torch.ones_like(x))   # an all-zero group: codes = zero point

    for f_lo in _CLIP:
        for f_hi in _CLIP:
            lo, hi = lo0 * f_lo, hi0 * f_hi
            s0 = bf16((hi - lo) / 15.0)
            for z in (torch.floor(-lo / s0).clamp_(0, 15), torch.ceil(-lo / s0).clamp_(0, 15)):
                cover = torch.maximum(hi / (15.0 - z).clamp(min=1), -lo / z.clamp(min=1))
                for s in (s0, bf16(cover)):
                    q = (torch.round(wc / s[..., None]) + z[..., None]).clamp_(0, 15)
                    err = ((q - z[..., None]) * s[..., None] - wc).square_().sum(dim=2)
                    if best is None:
                        best = [q, s, z, err]
                        continue
                    better = err < best[3]
                    best[0] = torch.where(better[..., None], q, best[0])
                    best[1] = torch.where(better, s, best[1])
                    best[2] = torch.where(better, z, best[2])
                    best[3] = torch.where(better, err, best[3])
    return best[0].to(torch.uint8), best[1], best[2]


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in/2] -> uint8 codes [..., in] (low nibble first)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def _kernel_offset(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int4 kernel's per-group offset (it computes (q - 8) * scale + offset) in its dtype: from an
    integer zero point, (8 - z) * scale (exact in fp32, rounded in bf16); a bf16 zero is the offset."""
    if zeros.dtype == torch.uint8:
        return ((8.0 - zeros.float()) * scales.float()).to(dtype)
    return zeros.to(dtype)


def dequantize(parts: dict, scheme: str, act_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 [out, in]: the reference maths (tests and accuracy studies only, never the hot path).
    act_dtype: the weight as the int4 kernel fed that activation dtype computes with (see the module
    doc; only the bf16 kernel rounds, and only the offset); int8 is the same for every dtype."""
    check_parts("<weight>", parts, scheme)
    if scheme == "int8":
        return parts["qweight"].float() * parts["scales"].float()[:, None]
    q = _unpack_nibbles(parts["qweight"]).float()
    out_f, in_f = q.shape
    ng = parts["scales"].shape[1]
    s = parts["scales"].float()
    z = _kernel_offset(parts["scales"], parts["zeros"], act_dtype).float()
    return ((q.reshape(out_f, ng, -1) - 8.0) * s[..., None] + z[..., None]).reshape(out_f, in_f)


def check_parts(name: str, parts: dict, scheme: str) -> None:
    """Raise ValueError naming the tensor when a part is missing or has the wrong dtype or shape."""
    _check_scheme(scheme)
    fix = f"re-split the model with --quantize {scheme} (the shard does not match its manifest)"
    for suf in _SUFFIXES[scheme]:
        if suf not in parts:
            raise ValueError(f"tensor {name}.{suf} is missing ({scheme} stores {', '.join(_SUFFIXES[scheme])}): {fix}")

    def want(suf, dtype, shape):
        t = parts[suf]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"tensor {name}.{suf} is {got}, {scheme} wants {dtype} {tuple(shape)}: {fix}")

    q = parts["qweight"]
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError(f"tensor {name}.qweight must be a 2-D tensor [out, in]: {fix}")
    out_f = q.shape[0]
    if scheme == "int8":
        want("qweight", torch.int8, q.shape)
        if q.shape[1] % IN_MULTIPLE:
            raise ValueError(f"tensor {name}.qweight has in_features {q.shape[1]}, not a multiple of {IN_MULTIPLE}: {fix}")
        want("scales", torch.float32, (out_f,))
        return
    want("qweight", torch.uint8, q.shape)
    in_f = q.shape[1] * 2
    s = parts["scales"]
    if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[1] == 0 or in_f % s.shape[1] \
            or in_f // s.shape[1] not in GROUP_SIZES or in_f % IN_MULTIPLE:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"tensor {name}.scales has shape {got}: int4 wants [{out_f}, {in_f} / group size] "
                         f"with a group size in {GROUP_SIZES}: {fix}")
    want("scales", torch.bfloat16, (out_f, s.shape[1]))
    z = parts["zeros"]   # an integer zero point, or a bf16 offset (shards written before 2026-11-29)
    want("zeros", torch.bfloat16 if isinstance(z, torch.Tensor) and z.dtype == torch.bfloat16 else torch.uint8,
         (out_f, s.shape[1]))
    if z.dtype == torch.uint8 and z.numel() and int(z.max()) > 15:
        raise ValueError(f"tensor {name}.zeros holds {int(z.max())}: an int4 zero point is 0..15: {fix}")


# --------------------------------------------------------------------------------------------------
# kernels


def default_act_dtype() -> torch.dtype:
    """The activation dtype the weight-only kernels vectorize on this CPU (see the module doc)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return torch.float32
    if machine in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return torch.bfloat16
    return torch.float32


def kernel_info() -> str:
    act = default_act_dtype()
    return (f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}: aten._weight_int8pack_mm / "
            f"_weight_int4pack_mm_for_cpu with {str(act).removeprefix('torch.')} activations")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 64-byte aligned (the x86 kernels use aligned vector loads)."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


# The int4 kernel's packed layout is [out/BN, in, BN/2] bytes with an architecture-dependent block
# BN and nibble placement (int4mm_kernel.cpp, weight_to_int4pack_kernel): AVX-512 "split" 64 (row r
# of a block in byte r % 32, high nibble when r >= 32), AVX2 "split" 32, otherwise "pairs" (rows 2i
# and 2i+1 share byte i). rows() reads codes straight from it, after checking once per process on a
# probe which of these the running torch produces.
_LAYOUTS = (("split", 64), ("split", 32), ("pairs", 64), ("pairs", 32), ("pairs", 16))


def _layout_index(layout, n: torch.Tensor, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte offsets [len(n), in] and nibble shifts [len(n), 1] of rows n in the packed buffer."""
    kind, bn = layout
    block, r = n // bn, n % bn
    if kind == "split":
        off, shift = r % (bn // 2), 4 * (r // (bn // 2))
    else:
        off, shift = r // 2, 4 * (r % 2)
    k = torch.arange(k_in)
    idx = (block * (bn * k_in // 2) + off)[:, None] + k[None, :] * (bn // 2)
    return idx, shift[:, None]


@functools.cache
def _int4_layout():
    g = torch.Generator().manual_seed(1)
    n, k = 2 * _N_PAD, 64
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2).reshape(-1)
    rows = torch.arange(n)
    for layout in _LAYOUTS:
        idx, shift = _layout_index(layout, rows, k)
        if torch.equal(((packed[idx] >> shift) & 0xF).to(torch.int32), codes):
            return layout
    return None


class QLinear:
    """y = x @ W^T + b with W held quantized; what a stage calls instead of F.linear."""

    def __init__(self, scheme, out_features, in_features, tensors, bias, act_dtype, group_size=None):
        self.scheme, self.out_features, self.in_features = scheme, out_features, in_features
        self.act_dtype, self.group_size = act_dtype, group_size
        self._t = tensors
        self.bias = None if bias is None else bias.float().contiguous()
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values()) + (
            0 if self.bias is None else self.bias.numel() * 4)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything this layer holds (for memory checks)."""
        return dict(self._t, **({} if self.bias is None else {"bias": self.bias}))

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], scheme: str, bias: torch.Tensor | None = None,
                   *, name: str = "<weight>", act_dtype: torch.dtype | None = None) -> "QLinear":
        """Build from the stored parts (see quantize). Packs for the kernel without any float copy
        of the weight: int4 codes go through int32 in chunks of a few hundred rows."""
        check_parts(name, parts, scheme)
        act = default_act_dtype() if act_dtype is None else act_dtype
        q = parts["qweight"]
        out_f = q.shape[0]
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias for {name} has shape {tuple(bias.shape)}, want ({out_f},)")
        if scheme == "int8":
            t = {"qweight": _aligned(q), "scales": parts["scales"].contiguous()}
            if act != torch.float32:
                t["unit_scales"] = torch.ones(out_f, dtype=act)  # kernel scale 1, fp32 scale after
            else:
                t["kernel_scales"] = t.pop("scales")
            return cls(scheme, out_f, q.shape[1], t, bias, act)

        in_f = q.shape[1] * 2
        ng = parts["scales"].shape[1]
        n_pad = -out_f % _N_PAD
        packed = torch.empty(out_f + n_pad, in_f // 2, dtype=torch.uint8)
        for r in range(0, out_f + n_pad, _ROWS_PER_CHUNK):
            codes = _unpack_nibbles(q[r:r + _ROWS_PER_CHUNK]).to(torch.int32)
            if r + _ROWS_PER_CHUNK > out_f and n_pad:  # the last chunk: pad to whole blocks
                codes = torch.cat([codes, torch.full((n_pad, in_f), 8, dtype=torch.int32)])
            packed[r:r + codes.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        sz = torch.zeros(ng, out_f + n_pad, 2, dtype=act)
        sz[:, :out_f, 0] = parts["scales"].t()
        sz[:, :out_f, 1] = _kernel_offset(parts["scales"], parts["zeros"], act).t()
        t = {"packed": _aligned(packed), "scales_zeros": sz}
        self = cls(scheme, out_f, in_f, t, bias, act, group_size=in_f // ng)
        self._layout = _int4_layout()
        if self._layout is None:  # an unknown packing on this torch build: keep the stored codes
            warnings.warn("unknown int4 packing layout in this torch build: rows() keeps a copy of the "
                          "stored int4 codes (0.5 byte per weight more)", stacklevel=2)
            t["codes"] = q.contiguous()
            self.nbytes += q.numel()
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QLinear: input has {x.shape[-1]} features, the weight takes {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features, dtype=torch.float32)
        else:
            xa = _aligned(x2.to(self.act_dtype))
            t = self._t
            if self.scheme == "int8":
                if self.act_dtype == torch.float32:
                    y = torch.ops.aten._weight_int8pack_mm(xa, t["qweight"], t["kernel_scales"])
                else:
                    y = torch.ops.aten._weight_int8pack_mm(xa, t["qweight"], t["unit_scales"]).float()
                    y.mul_(t["scales"])
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xa, t["packed"], self.group_size, t["scales_zeros"])
                if y.shape[1] != self.out_features:
                    y = y[:, :self.out_features]
                y = y.float()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows W[ids] as float32 [n, in] (embedding lookup / tied head)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.out_features):
            raise IndexError(f"row id out of range 0..{self.out_features - 1}")
        t = self._t
        if self.scheme == "int8":
            scales = t["scales"] if "scales" in t else t["kernel_scales"]
            return t["qweight"][ids].float() * scales[ids].float()[:, None]
        if "codes" in t:
            q = _unpack_nibbles(t["codes"][ids]).float()
        else:
            idx, shift = _layout_index(self._layout, ids, self.in_features)
            q = ((t["packed"].reshape(-1)[idx] >> shift) & 0xF).float()
        sz = t["scales_zeros"][:, ids].float()  # [groups, n, 2]
        s, z = sz[..., 0].t(), sz[..., 1].t()
        q = q.reshape(ids.numel(), self.in_features // self.group_size, self.group_size)
        return ((q - 8.0) * s[..., None] + z[..., None]).reshape(ids.numel(), self.in_features)

    def __repr__(self):
        return (f"QLinear({self.scheme}, out={self.out_features}, in={self.in_features}, "
                f"act={str(self.act_dtype).removeprefix('torch.')}, {self.nbytes} bytes)")
