"""Deterministic all-reduce cases and their references, for tests.

Every rank of a test ring builds the same list of cases and can regenerate
*every* rank's input of a case from ``(seed, case index, rank)``, so each
worker checks its own result against a numpy/torch reference without
exchanging tensors.  Floating results are checked against a bound on the
rounding (and, when quantized, on the quantization) error of *any* order
of reduction; integers, MIN and MAX must be exact.  Bit-identity across
peers is checked by the parent by comparing the hashes the workers report.
"""

from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..types import Quantization, ReduceOp

FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8")
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES

# Spacing of 1.0 and the next value: a generous unit of rounding.
_EPS = {
    "float32": 2.0**-23,
    "float64": 2.0**-52,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}

# Ranges for SUM/AVG: the sum of 8 peers must not overflow.
_SUM_RANGE = {
    "int8": (-15, 15),
    "uint8": (0, 31),
    "int16": (-4000, 4000),
    "int32": (-(2**27), 2**27),
    "int64": (-(2**59), 2**59),
}

# Ranges for PROD on ranks 0..2; the other ranks contribute only +/-1, so the
# product of any number of peers stays representable.
_PROD_RANGE = {
    "int8": (-1, 2),
    "uint8": (0, 3),
    "int16": (-30, 30),
    "int32": (-1000, 1000),
    "int64": (-(10**6), 10**6),
}


@dataclass(frozen=True)
class Case:
    """One all-reduce of a test matrix."""

    index: int
    dtype: str
    op: ReduceOp
    quant: Quantization
    size: int
    in_place: bool
    use_torch: bool

    @property
    def name(self) -> str:
        q = "q8" if self.quant == Quantization.UINT8_MINMAX else "fp"
        where = "inplace" if self.in_place else "outofplace"
        lib = "torch" if self.use_torch else "numpy"
        return f"{self.dtype}-{self.op.name}-{q}-n{self.size}-{where}-{lib}"


def matrix_sizes(world: int) -> list[int]:
    """Odd sizes: empty, one element, fewer elements than peers, primes
    (the largest spans several slices when slices are small)."""
    sizes = {0, 1, max(world - 1, 1), 3, 7, 1009, 65537}
    return sorted(sizes)


def matrix_cases(world: int, dtypes=ALL_DTYPES, ops=tuple(ReduceOp), sizes=None) -> list[Case]:
    """Every dtype x op x size, quantized and not for floating dtypes; the
    placement (in place / out of place) and the container (numpy / torch)
    alternate so each (dtype, op, quantization) sees both."""
    sizes = matrix_sizes(world) if sizes is None else sizes
    cases: list[Case] = []
    for dtype in dtypes:
        quants = [Quantization.NONE]
        if dtype in FLOAT_DTYPES:
            quants.append(Quantization.UINT8_MINMAX)
        for op_i, op in enumerate(ops):
            for quant in quants:
                for size_i, size in enumerate(sizes):
                    cases.append(
                        Case(
                            index=len(cases),
                            dtype=dtype,
                            op=ReduceOp(op),
                            quant=quant,
                            size=size,
                            in_place=(size_i + op_i) % 2 == 0,
                            use_torch=dtype == "bfloat16" or (size_i + op_i + int(quant)) % 3 == 0,
                        )
                    )
    return cases


# --------------------------------------------------------------------------
# Inputs.


def _rng(seed: int, case_index: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, case_index, rank])


def input_values(case: Case, rank: int, world: int, seed: int) -> np.ndarray:
    """Rank ``rank``'s input of ``case`` as exact values: int64 for integer
    dtypes, float64 (already rounded to the dtype) for floating ones."""
    rng = _rng(seed, case.index, rank)
    n = case.size
    if case.dtype in INT_DTYPES:
        info = np.iinfo(case.dtype)
        if case.op in (ReduceOp.SUM, ReduceOp.AVG):
            lo, hi = _SUM_RANGE[case.dtype]
        elif case.op == ReduceOp.PROD:
            lo, hi = _PROD_RANGE[case.dtype] if rank < 3 else (-1, 1)
            if rank >= 3:
                vals = rng.choice(np.array([-1, 1] if info.min < 0 else [1, 1]), size=n)
                return vals.astype(np.int64)
        else:
            lo, hi = int(info.min), int(info.max)
        return rng.integers(lo, hi, size=n, endpoint=True, dtype=np.int64)
    if case.op == ReduceOp.PROD:
        if case.quant == Quantization.NONE:
            mag = rng.uniform(0.8, 1.25, size=n)
            vals = np.where(rng.random(n) < 0.5, -mag, mag)
        else:
            vals = rng.uniform(0.9, 1.1, size=n)
    else:
        vals = rng.uniform(-1.0, 1.0, size=n)
    return round_to_dtype(vals, case.dtype)


def round_to_dtype(vals: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to ``dtype`` and back (exact in float64)."""
    if dtype == "bfloat16":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float64))
        return t.to(torch.bfloat16).to(torch.float64).numpy()
    return vals.astype(dtype).astype(np.float64)


def make_tensor(values: np.ndarray, dtype: str, use_torch: bool) -> Any:
    """A fresh contiguous numpy array or torch tensor holding ``values``."""
    if use_torch or dtype == "bfloat16":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(values))
        return t.to(getattr(torch, dtype)).contiguous().clone()
    return np.ascontiguousarray(values.astype(dtype))


def empty_like_garbage(x: Any) -> Any:
    """An output buffer shaped like ``x`` full of junk bytes."""
    if isinstance(x, np.ndarray):
        out = np.empty_like(x)
        out.view(np.uint8)[...] = 0xA5
        return out
    import torch

    out = torch.empty_like(x)
    if out.numel():
        ctypes.memset(out.data_ptr(), 0xA5, out.numel() * out.element_size())
    return out


def tensor_bytes(x: Any) -> bytes:
    """The raw bytes of a numpy array or contiguous CPU torch tensor."""
    if isinstance(x, np.ndarray):
        return x.tobytes()
    nbytes = x.numel() * x.element_size()
    return ctypes.string_at(x.data_ptr(), nbytes) if nbytes else b""


def tensor_hash(x: Any) -> str:
    return hashlib.sha256(tensor_bytes(x)).hexdigest()


def tensor_values(x: Any, dtype: str) -> np.ndarray:
    """The values of ``x`` as int64 (integer dtypes) or float64."""
    if not isinstance(x, np.ndarray):
        import torch

        x = x.to(torch.float64 if dtype in FLOAT_DTYPES else torch.int64).numpy()
    return x.astype(np.float64 if dtype in FLOAT_DTYPES else np.int64)


# --------------------------------------------------------------------------
# References.


def reference(stack: np.ndarray, op: ReduceOp, integer: bool) -> np.ndarray:
    """Exact (integers) or float64 reduction of ``stack`` (world x n)."""
    world = stack.shape[0]
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        total = stack.sum(axis=0)
        if op == ReduceOp.SUM:
            return total
        if integer:
            # C division: truncates toward zero.
            return np.sign(total) * (np.abs(total) // world)
        return total / world
    if op == ReduceOp.MIN:
        return stack.min(axis=0)
    if op == ReduceOp.MAX:
        return stack.max(axis=0)
    return np.prod(stack, axis=0)


def tolerance(stack: np.ndarray, ref: np.ndarray, case: Case) -> tuple[np.ndarray, float]:
    """``(max error per element, bound on the RMS error)`` for a floating
    case; MIN/MAX unquantized must be exact (0)."""
    world = stack.shape[0]
    eps = _EPS[case.dtype]
    op = case.op
    # Rounding: any order of w-1 operations plus the final rounding.
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        tol = (world + 1) * eps * np.abs(stack).sum(axis=0)
        if op == ReduceOp.AVG:
            tol = tol / world + 2 * eps * np.abs(ref)
    elif op == ReduceOp.PROD:
        tol = 2 * (world + 1) * eps * np.abs(ref)
    else:
        tol = np.zeros_like(ref)
    if case.quant == Quantization.NONE or stack.shape[1] == 0:
        return tol, float("inf")
    # Quantization: each peer re-quantizes a partial result whose range is
    # at most `span`; each time an error of at most span/510 enters, and
    # later reductions carry it with at most `gain`.  Allow twice that.
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        span = float(sum(np.ptp(row) for row in stack))
        gain = 1.0
    elif op == ReduceOp.PROD:
        hi = float(np.abs(stack).max())
        lo = float(np.abs(stack).min())
        span = hi**world - lo**world
        gain = max(hi, 1.0) ** world
    else:
        span = float(stack.max() - stack.min())
        gain = 1.0
    qtol = world * span * gain / 255.0
    if op == ReduceOp.AVG:
        qtol /= world
    # Dequantization rounds once more per hop in the dtype.
    qtol_elems = 2 * tol + qtol + (world + 1) * eps * np.abs(ref)
    # Over many elements the errors are independent and centred, so their
    # RMS sits well below the worst case; a broken quantizer does not.
    if stack.shape[1] < 1000:
        return qtol_elems, float("inf")
    return qtol_elems, qtol / 2 + 4 * float(np.sqrt(np.mean(tol**2)))


def check_result(case: Case, rank_inputs: list[np.ndarray], result: np.ndarray) -> str | None:
    """None when ``result`` (values of the reduced tensor) is right, else
    a short description of the worst element."""
    integer = case.dtype in INT_DTYPES
    n = case.size
    if result.shape != (n,):
        return f"result has shape {result.shape}, expected ({n},)"
    if n == 0:
        return None
    stack = np.stack(rank_inputs)
    ref = reference(stack, case.op, integer)
    if integer:
        bad = np.nonzero(result != ref)[0]
        if bad.size:
            i = int(bad[0])
            return f"{bad.size} wrong elements, first [{i}]: got {result[i]}, expected {ref[i]}"
        return None
    if not np.all(np.isfinite(result)):
        i = int(np.nonzero(~np.isfinite(result))[0][0])
        return f"non-finite result [{i}]: {result[i]}"
    tol, rms_bound = tolerance(stack, ref, case)
    err = np.abs(result - ref)
    over = err > tol
    if over.any():
        i = int(np.argmax(err - tol))
        return (
            f"{int(over.sum())} elements off, worst [{i}]: got {result[i]!r}, "
            f"expected {ref[i]!r} +/- {tol[i]:.3g}"
        )
    rms = float(np.sqrt(np.mean(err**2)))
    if rms > rms_bound:
        return f"RMS error {rms:.3g} exceeds {rms_bound:.3g}"
    return None


# --------------------------------------------------------------------------
# Large, cheap inputs: integer-valued float32, so any order of summation
# is exact and the reference is a closed form.


def ramp_input(n: int, rank: int) -> np.ndarray:
    """float32 values in -500..500, different per rank."""
    i = np.arange(n, dtype=np.int64)
    return (((i * 7 + rank * 13) % 1001) - 500).astype(np.float32)


def ramp_sum_matches(result: np.ndarray, ranks: list[int], block: int = 1 << 22) -> str | None:
    """Check ``result`` equals the SUM of :func:`ramp_input` over ``ranks``,
    block by block (bounded memory)."""
    n = result.size
    for start in range(0, n, block):
        stop = min(n, start + block)
        i = np.arange(start, stop, dtype=np.int64)
        ref = np.zeros(stop - start, dtype=np.int64)
        for r in ranks:
            ref += ((i * 7 + r * 13) % 1001) - 500
        got = result[start:stop]
        bad = np.nonzero(got != ref.astype(np.float32))[0]
        if bad.size:
            j = int(bad[0])
            return (
                f"{bad.size} wrong elements in [{start}, {stop}), first [{start + j}]: "
                f"got {got[j]}, expected {ref[j]}"
            )
    return None


# --------------------------------------------------------------------------
# Special values: NaN, infinities, signed zeros and subnormals.

SPECIAL_SIZE = 1009


def special_input(case: Case, rank: int, world: int, seed: int) -> np.ndarray:
    """Random values with, near the start, NaN on rank 0, +inf on rank 1,
    -inf and +inf at one position (a NaN sum), -0.0 everywhere at one
    position and a subnormal at another."""
    vals = input_values(case, rank, world, seed)
    tiny = {
        "float32": 2.0**-140,
        "float64": 2.0**-1060,
        "float16": 2.0**-20,
        "bfloat16": 2.0**-130,
    }[case.dtype]
    vals[0] = np.nan if rank == 0 else 0.5
    vals[1] = np.inf if rank == 1 % world else 0.25
    vals[2] = -np.inf if rank == 0 else (np.inf if rank == 1 else 1.0)
    vals[3] = -0.0
    # (A product of subnormals underflows in the dtype, not in float64.)
    vals[4] = 1.0 if case.op == ReduceOp.PROD else tiny * (rank + 1)
    return round_to_dtype(vals, case.dtype)


def check_special(case: Case, rank_inputs: list[np.ndarray], result: np.ndarray) -> str | None:
    """IEEE semantics where they are defined: NaN and infinities propagate
    through SUM/AVG/PROD, MIN/MAX are exact away from NaN, -0.0 keeps its
    sign; elsewhere the usual tolerances.  Quantized: chunks without
    special values (every chunk but the first) still meet their bound."""
    world = len(rank_inputs)
    stack = np.stack(rank_inputs)
    if case.quant != Quantization.NONE:
        first_chunk = -(-case.size // world)
        if first_chunk >= case.size:
            return None
        sub = Case(
            case.index,
            case.dtype,
            case.op,
            case.quant,
            case.size - first_chunk,
            case.in_place,
            case.use_torch,
        )
        return check_result(sub, [row[first_chunk:] for row in rank_inputs], result[first_chunk:])
    with np.errstate(invalid="ignore", over="ignore"):
        ref = reference(stack, case.op, integer=False)
    any_nan = np.isnan(stack).any(axis=0)
    if case.op in (ReduceOp.MIN, ReduceOp.MAX):
        check = ~any_nan
        if not np.array_equal(result[check], ref[check]):
            i = int(np.nonzero(result[check] != ref[check])[0][0])
            return f"MIN/MAX away from NaN: got {result[check][i]}, expected {ref[check][i]}"
    else:
        nan_ref = np.isnan(ref)
        if not np.isnan(result[nan_ref]).all():
            return f"NaN expected at {np.nonzero(nan_ref)[0].tolist()}, got {result[nan_ref]}"
        inf_ref = np.isinf(ref)
        if not np.array_equal(result[inf_ref], ref[inf_ref]):
            return (
                f"infinities expected at {np.nonzero(inf_ref)[0].tolist()}: "
                f"got {result[inf_ref]}, expected {ref[inf_ref]}"
            )
        finite = np.isfinite(ref)
        sub = Case(
            case.index,
            case.dtype,
            case.op,
            case.quant,
            int(finite.sum()),
            case.in_place,
            case.use_torch,
        )
        wrong = check_result(sub, [row[finite] for row in rank_inputs], result[finite])
        if wrong:
            return wrong
    if case.op != ReduceOp.PROD and not np.signbit(result[3]):
        return f"-0.0 {case.op.name} -0.0 gave {result[3]!r}"
    return None
