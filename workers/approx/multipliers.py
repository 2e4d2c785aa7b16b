"""Approximate multipliers as product tables: values[a - lo, b - lo] = approx(a * b).

A `ProductTable` holds every product of two `bits`-bit operands (256 x 256 for 8 bits), signed
(operands -128..127) or unsigned (0..255). The built-ins (`MULTIPLIERS`, each
`factory(bits=8, signed=True) -> ProductTable`):

  exact        a * b.
  truncated    the array multiplier with every partial-product bit below column k dropped:
               approx(a, b) = sum over bits a_i, b_j with i + j >= k of a_i b_j 2**(i+j)
               (k = bits by default; `truncatedK` in `table_by_name`, e.g. truncated6). It never
               overestimates, and the error is below 2**k * k.
  mitchell     Mitchell's logarithmic multiplier: a = 2**ka (1 + fa), b = 2**kb (1 + fb) with
               0 <= f < 1; approx = 2**(ka+kb) (1 + fa + fb) if fa + fb < 1, else
               2**(ka+kb+1) (fa + fb); 0 if an operand is 0. Integer-valued for integer
               operands; never overestimates (at most 11.1 % low).
  drum4, drum6 DRUM-k (dynamic-range unbiased multiplier): an operand with more than k
               significant bits keeps its k leading bits, the lowest of them forced to 1, the
               rest zeroed; smaller operands pass unchanged; approx = f(a) * f(b). Unbiased on
               average (errors of both signs, mean relative error near 0).

Signed built-ins apply the unsigned approximation to the magnitudes and restore the sign:
approx(a, b) = sign(a) sign(b) approx_unsigned(|a|, |b|) (|-128| = 128 fits the unsigned
`bits`-bit core). Built-ins whose table is a sum of a few products of one-operand functions
(exact and DRUM: rank 1; truncated: one term per operand bit) carry those `factors`, which the
convolution uses to compute with ordinary float convolutions (see conv.py).

`load_table(path)` reads a user's table (.npy or .csv, e.g. an EvoApprox8b circuit exported as a
256 x 256 table); `table_by_name(spec)` takes a built-in name or such a path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.registry import Registry

# User tables must fit in int32: the convolution's exact float accumulation relies on it.
MAX_ABS_VALUE = 2**31 - 1
MAX_BITS = 12


@dataclass
class ProductTable:
    """Every product of two operands: values[a - lo, b - lo] = approx(a * b), int64 (n x n).

    `factors`, when set, is (F, G), int64 (n x r) each, with values == F @ G.T exactly: the
    table is a sum of r products f_r(a) g_r(b) (checked on construction).
    """

    name: str
    bits: int
    signed: bool
    values: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = 2**self.bits
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"product table {self.name!r}: bits must be 1..{MAX_BITS}, got {self.bits}")
        values = torch.as_tensor(self.values)
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"product table {self.name!r}: values must be integers, got {values.dtype}")
        if tuple(values.shape) != (n, n):
            raise ValueError(
                f"product table {self.name!r}: values must be {n}x{n} for {self.bits}-bit operands, "
                f"got {'x'.join(map(str, values.shape))}"
            )
        self.values = values.to(torch.int64).cpu().contiguous()
        if self.factors is not None:
            f, g = (torch.as_tensor(t).to(torch.int64).cpu().contiguous() for t in self.factors)
            if f.shape[0] != n or g.shape != f.shape or f.dim() != 2:
                raise ValueError(f"product table {self.name!r}: factors must be two {n} x r tensors")
            if not torch.equal(f @ g.T, self.values):
                raise ValueError(f"product table {self.name!r}: factors do not reproduce the values")
            self.factors = (f, g)

    @property
    def lo(self) -> int:
        """The smallest operand: -2**(bits-1) signed, 0 unsigned."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        """The largest operand: 2**(bits-1) - 1 signed, 2**bits - 1 unsigned."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def size(self) -> int:
        return 2**self.bits

    def lookup(self, a: int, b: int) -> int:
        """approx(a * b) for two operands in lo..hi."""
        if not (self.lo <= a <= self.hi and self.lo <= b <= self.hi):
            raise ValueError(f"operands {a}, {b} outside {self.lo}..{self.hi}")
        return int(self.values[a - self.lo, b - self.lo])

    def operands(self) -> torch.Tensor:
        """The operand values lo..hi in table order."""
        return torch.arange(self.lo, self.hi + 1, dtype=torch.int64)


MULTIPLIERS: Registry[Callable[..., ProductTable]] = Registry("multiplier")


def _grid(bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Operands (n,), their magnitudes and signs for the signed-magnitude rule."""
    lo = -(2 ** (bits - 1)) if signed else 0
    ops = torch.arange(lo, lo + 2**bits, dtype=torch.int64)
    return ops.abs(), torch.sign(ops)


def _from_factors(name: str, bits: int, signed: bool, f: torch.Tensor, g: torch.Tensor) -> ProductTable:
    return ProductTable(name, bits, signed, f @ g.T, factors=(f, g))


def _from_function(
    name: str, bits: int, signed: bool, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> ProductTable:
    mag, sign = _grid(bits, signed)
    values = fn(mag[:, None], mag[None, :]) * (sign[:, None] * sign[None, :])
    return ProductTable(name, bits, signed, values)


@MULTIPLIERS.register("exact")
def exact(bits: int = 8, signed: bool = True) -> ProductTable:
    mag, sign = _grid(bits, signed)
    ops = (mag * sign)[:, None]
    return _from_factors("exact", bits, signed, ops, ops.clone())


@MULTIPLIERS.register("truncated")
def truncated(bits: int = 8, signed: bool = True, k: int | None = None) -> ProductTable:
    """Partial-product bits below column k dropped (k = bits by default)."""
    k = bits if k is None else k
    if not 0 <= k <= 2 * bits:
        raise ValueError(f"truncated: k must be 0..{2 * bits}, got {k}")
    mag, sign = _grid(bits, signed)
    width = bits  # |operand| <= 2**(bits-1) for signed, so `bits` magnitude bits always suffice
    # approx(a, b) = sum_i a_i 2**i * (b with its lowest k - i bits cleared).
    f = torch.stack([((mag >> i) & 1) << i for i in range(width)], dim=1) * sign[:, None]
    g = torch.stack(
        [(mag >> max(k - i, 0)) << max(k - i, 0) for i in range(width)], dim=1
    ) * sign[:, None]
    return _from_factors(f"truncated{k}", bits, signed, f, g)


def _log2_floor(m: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(m)
    for s in range(1, 63):
        out = torch.where(m >= (1 << s), torch.full_like(m, s), out)
        if int(m.max()) < (1 << (s + 1)):
            break
    return out


def _mitchell_unsigned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = torch.broadcast_tensors(a, b)
    ka, kb = _log2_floor(a.clamp(min=1)), _log2_floor(b.clamp(min=1))
    # fa = (a - 2**ka) / 2**ka; in integers scaled by 2**(ka+kb):
    fa_s = (a - (1 << ka)) << kb  # fa * 2**(ka+kb)
    fb_s = (b - (1 << kb)) << ka
    base = 1 << (ka + kb)
    small = fa_s + fb_s < base
    out = torch.where(small, base + fa_s + fb_s, 2 * (fa_s + fb_s))
    return torch.where((a == 0) | (b == 0), torch.zeros_like(out), out)


@MULTIPLIERS.register("mitchell")
def mitchell(bits: int = 8, signed: bool = True) -> ProductTable:
    return _from_function("mitchell", bits, signed, _mitchell_unsigned)


def _drum_operand(m: torch.Tensor, k: int) -> torch.Tensor:
    t = _log2_floor(m.clamp(min=1))
    shift = (t - k + 1).clamp(min=0)
    approx = (((m >> shift) | 1) << shift)
    return torch.where(m >= (1 << k), approx, m)


def drum(bits: int = 8, signed: bool = True, k: int = 4) -> ProductTable:
    """DRUM-k: k leading bits kept, the lowest of them set to 1 (operands of <= k bits exact)."""
    if not 1 <= k <= bits:
        raise ValueError(f"drum: k must be 1..{bits}, got {k}")
    mag, sign = _grid(bits, signed)
    f = (_drum_operand(mag, k) * sign)[:, None]
    return _from_factors(f"drum{k}", bits, signed, f, f.clone())


@MULTIPLIERS.register("drum4")
def drum4(bits: int = 8, signed: bool = True) -> ProductTable:
    return drum(bits, signed, 4)


@MULTIPLIERS.register("drum6")
def drum6(bits: int = 8, signed: bool = True) -> ProductTable:
    return drum(bits, signed, 6)


# ---------------------------------------------------------------------------------------------
# User tables


def _fail(path: object, what: str, expected: str) -> ValueError:
    return ValueError(f"product table {path}: {what}; expected {expected}")


_EXPECTED = (
    "a square 2**bits x 2**bits table of whole numbers (256x256 for 8-bit operands), "
    "in .npy or .csv (comma-separated rows)"
)


def _read_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise _fail(path, f"unknown file type {suffix or '(none)'!r}", _EXPECTED)
    if not path.is_file():
        raise _fail(path, "no such file", _EXPECTED)
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(path, f"cannot be read ({first})", _EXPECTED) from None


def _layouts(values: torch.Tensor, bits: int, signed: bool | None) -> list[tuple[bool, torch.Tensor, str]]:
    n = 2**bits
    half = n // 2
    cands: list[tuple[bool, torch.Tensor, str]] = []
    if signed in (None, False):
        cands.append((False, values, "unsigned"))
    if signed in (None, True):
        cands.append((True, values, "signed, rows -128..127"))
        # Two's-complement order (row i holds operand i if i < 128 else i - 256), what a C loop
        # over uint8 codes writes: rolled into table order.
        cands.append((True, torch.roll(values, shifts=(half, half), dims=(0, 1)), "signed, two's complement"))
    return cands


def load_table(path: str | Path, signed: bool | None = None) -> ProductTable:
    """A user's product table from .npy or .csv (comma-separated rows, no header).

    The table is square, 2**bits x 2**bits (256 x 256 for 8-bit operands), whole numbers (an
    integer dtype, or floats that are all whole), |value| < 2**31. Row = first operand, column
    = second. Signedness: `signed` if given; otherwise the reading whose exact products the table
    is closest to (mean |table - a*b|) among unsigned (row i = operand i, 0..255), signed
    (row i = operand i - 128) and signed in two's-complement order (row i = operand i for
    i < 128, i - 256 above; what a C loop over uint8 codes writes, e.g. an EvoApprox8b mul8s
    circuit), the last only if its error is under half the plain signed order's. With
    `signed=True` the two signed orders are compared the same way. A table unlike any
    multiplier (e.g. random values) should be loaded with an explicit `signed`. Any problem
    raises ValueError with one line naming the path, what is wrong and what is expected.
    """
    p = Path(path)
    arr = _read_array(p)
    if arr.dtype.kind not in "iuf":
        raise _fail(p, f"dtype {arr.dtype} is not an integer or float type", _EXPECTED)
    shape = "x".join(map(str, arr.shape))
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 2:
        raise _fail(p, f"shape {shape}", _EXPECTED)
    n = arr.shape[0]
    bits = n.bit_length() - 1
    if 2**bits != n or bits > MAX_BITS:
        raise _fail(p, f"shape {shape} (side not a power of two up to 2**{MAX_BITS})", _EXPECTED)
    if arr.dtype.kind == "f":
        if np.isnan(arr).any():
            raise _fail(p, f"{int(np.isnan(arr).sum())} NaN values", _EXPECTED)
        if not np.isfinite(arr).all():
            raise _fail(p, "infinite values", _EXPECTED)
        frac = arr != np.round(arr)
        if frac.any():
            i, j = map(int, np.argwhere(frac)[0])
            raise _fail(p, f"non-integer value {float(arr[i, j])!r} at row {i}, column {j}", _EXPECTED)
    big = np.abs(arr.astype(np.float64)) > MAX_ABS_VALUE
    if big.any():
        raise _fail(p, f"{int(big.sum())} values with |value| >= 2**31", _EXPECTED)
    values = torch.from_numpy(arr.astype(np.int64))
    scored = []
    for is_signed, table, layout in _layouts(values, bits, signed):
        lo = -(n // 2) if is_signed else 0
        ops = torch.arange(lo, lo + n, dtype=torch.int64)
        err = float((table - ops[:, None] * ops[None, :]).abs().double().mean())
        # The two's-complement order must be clearly closer (half the error) to be taken, so
        # that a table unlike any multiplier keeps the documented row order.
        scored.append((err * (2.0 if "two's" in layout else 1.0), is_signed, table))
    _, is_signed, table = min(scored, key=lambda s: s[0])
    return ProductTable(p.stem, bits, is_signed, table.contiguous())


_PARAMETERIZED = {"truncated": truncated, "drum": drum}


def table_by_name(spec: str, signed: bool | None = None, bits: int = 8) -> ProductTable:
    """A built-in (`exact`, `truncated`, `truncatedK`, `mitchell`, `drum4`, `drum6`, `drumK`;
    signed unless `signed=False`) or the path of a .npy/.csv table (see load_table)."""
    spec = str(spec)
    path = Path(spec)
    if path.suffix.lower() in (".npy", ".csv") or path.is_file():
        return load_table(path, signed)
    is_signed = True if signed is None else signed
    if spec in MULTIPLIERS:
        return MULTIPLIERS.get(spec)(bits=bits, signed=is_signed)
    m = re.fullmatch(r"(truncated|drum)(\d+)", spec)
    if m:
        name, k = m.group(1), int(m.group(2))
        return _PARAMETERIZED[name](bits, is_signed, k=k)
    raise ValueError(
        f"unknown multiplier {spec!r}; valid: {', '.join(MULTIPLIERS.names())}, truncatedK, drumK, "
        "or the path of a .npy/.csv product table"
    )
