r"""Per-sample seeded Gaussian noise that does not depend on the batch.

`PerSampleNoise` gives sample $k$ of a batch its own seed $s_k$; every draw for that sample
is a pure function of $(s_k, \text{stream}, j)$, where the stream names the use (the prior draw
$x_T$, or sampler step $i$) and $j$ is the element index inside one sample. Sample $k$ is therefore
bitwise identical whether it is drawn in a batch of 1, 7 or 1,000, at any position, and on any
number of workers (the distributed sampler hands each rank the seeds of its global indices).

**Generator.** A counter-based design (Salmon et al. 2011, "Parallel random numbers: as easy as
1, 2, 3"): a stream key is derived from the seed and the stream counters with the splitmix64
finaliser, and word $j$ of the stream is the splitmix64 output
$\mathrm{mix}(\text{key} + (j+1)\gamma)$ with $\gamma$ = ``0x9E3779B97F4A7C15`` (Steele, Lea &
Flood 2014, "Fast splittable pseudorandom number generators", Fig. 16). The words become uniforms
$u = \lfloor w / 2^{11} \rfloor \, 2^{-53}$ and pairs of uniforms become normals by Box–Muller
(Box & Muller 1958):

$$z_{2p} = r\cos(2\pi u_{2p+1}),\quad z_{2p+1} = r\sin(2\pi u_{2p+1}),\quad r = \sqrt{-2\log(1-u_{2p})}.$$

**Bitwise reproducibility.** Integer arithmetic is exact, and $\log$, $\cos$, $\sin$ are evaluated
with exact range reduction plus fixed polynomials and Newton steps built only from ``+ - * /``
(each a separate, correctly rounded IEEE-754 float64 operation), never with the library's
transcendental or ``sqrt`` kernels, whose SIMD and scalar paths may differ in the last bit (so the
result would depend on where an element sits in the batch, and on the device). The draws are computed in float64 and then cast to the requested dtype, so the
float32 noise is the rounded float64 noise and results agree across CPU thread counts, batch sizes
and devices (CPU and CUDA both round these operations exactly).

The integer hash relies on int64 multiplication wrapping modulo $2^{64}$ (two's complement), which
is what PyTorch's CPU and CUDA kernels do; ``tests/reliability/test_rng.py`` checks the tensor hash
against a pure-Python reference computed modulo $2^{64}$.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["PerSampleNoise", "splitmix64"]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
# Stream tags: the prior draw and the sampler steps live in disjoint key spaces.
_TAG_PRIOR = 0x5052494F52  # "PRIOR"
_TAG_STEP = 0x53544550  # "STEP"
_TAG_USER = 0x55534552  # "USER"

_LN2 = math.log(2.0)
_SQRT_HALF = math.sqrt(0.5)
_HALF_PI = 0.5 * math.pi
# Taylor coefficients: atanh series 1/(2k+1), sin 1/(2k+1)!, cos 1/(2k)! (with alternating signs).
_ATANH_COEF = [1.0 / (2 * k + 1) for k in range(11)]
_SIN_COEF = [(-1) ** k / math.factorial(2 * k + 1) for k in range(9)]
_COS_COEF = [(-1) ** k / math.factorial(2 * k) for k in range(10)]
# Exact powers of two 2**k, k in [-40, 40], for the exponent half in _sqrt (inputs lie in [2**-53, 74]).
_POW2_MIN = -40
_POW2 = torch.tensor([2.0**k for k in range(_POW2_MIN, 41)], dtype=torch.float64)


def _signed(v: int) -> int:
    """A 64-bit unsigned value as the int64 with the same bits."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors (multiplications wrap modulo 2^64)."""
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    return z ^ _srl(z, 31)


def splitmix64(v: int) -> int:
    """The splitmix64 finaliser on one Python int, modulo 2^64 (the reference for `_mix`)."""
    z = v & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _poly(z: Tensor, coef: Sequence[float]) -> Tensor:
    """Horner evaluation of ``sum_k coef[k] z**k`` with separate (correctly rounded) ops."""
    acc = torch.full_like(z, coef[-1])
    for c in reversed(coef[:-1]):
        acc.mul_(z).add_(c)  # in place: two correctly rounded ops, no temporaries
    return acc


def _log_unit(u: Tensor) -> Tensor:
    r"""$\log u$ for float64 $u \in (0, 1]$ from exact exponent extraction and an atanh series.

    $u = m\,2^e$ with $m \in [\sqrt{1/2}, \sqrt 2)$; $\log m = 2\,\mathrm{atanh}(s)$, $s = (m-1)/(m+1)$,
    $|s| \le 0.172$, so 11 series terms leave a relative truncation error below $10^{-16}$.
    """
    m, e = torch.frexp(u)
    low = m < _SQRT_HALF
    m = torch.where(low, m * 2.0, m)
    e = (e - low.to(e.dtype)).to(u.dtype)
    s = (m - 1.0) / (m + 1.0)
    return e * _LN2 + 2.0 * s * _poly(s * s, _ATANH_COEF)


def _sqrt(y: Tensor) -> Tensor:
    r"""$\sqrt y$ for float64 $y \ge 0$ by exact exponent halving and Newton's iteration.

    ``torch.sqrt`` is not correctly rounded on every CPU path (its SIMD and scalar results can
    differ in the last bit), so it is rebuilt from ``* + /``: $y = m\,2^{2k}$ with $m \in [1/2, 2)$,
    $\sqrt y = \sqrt m\,2^k$ where $2^k$ comes exactly from a table; five Newton steps
    $x \leftarrow (x + m/x)/2$ from a linear guess (relative error < 0.09) reach full precision.
    """
    m, e = torch.frexp(y)
    odd = torch.remainder(e, 2) == 1
    m = torch.where(odd, m * 2.0, m)
    half_e = torch.div(e - odd.to(e.dtype), 2, rounding_mode="floor")
    x = 0.41 + 0.59 * m
    for _ in range(5):
        x = 0.5 * (x + m / x)
    scale = _POW2.to(y.device)[(half_e - _POW2_MIN).clamp(0, _POW2.numel() - 1).long()]
    return torch.where(y > 0, x * scale, torch.zeros_like(y))


def _cos_sin_2pi(v: Tensor) -> tuple[Tensor, Tensor]:
    r"""$(\cos 2\pi v, \sin 2\pi v)$ for float64 $v \in [0, 1)$.

    Exact reduction to a quadrant $q$ and $\varphi \in [-\pi/4, \pi/4)$ (``4v`` and ``4v - q`` are
    exact in binary floating point), Taylor polynomials of degree 17/18 (error below $10^{-16}$),
    then a rotation by $q\pi/2$.
    """
    w = v * 4.0
    q = torch.floor(w + 0.5)
    phi = (w - q) * _HALF_PI
    p2 = phi * phi
    s = phi * _poly(p2, _SIN_COEF)
    c = _poly(p2, _COS_COEF)
    q = torch.remainder(q, 4.0)
    cos = torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))
    sin = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    return cos, sin


def _check_shape(shape, batch: int, name: str = "shape") -> tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if (not isinstance(shape, (tuple, list)) or len(shape) < 1
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise ValueError(f"{name} must be a tuple (B, *D) of non-negative ints, got {shape!r}")
    if shape[0] != batch:
        raise ValueError(f"{name}[0] must equal the number of seeds ({batch}), got {shape!r}")
    return tuple(shape)


def _check_seeds(seeds) -> list[int]:
    if isinstance(seeds, Tensor):
        if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool or seeds.ndim != 1:
            raise TypeError(f"seeds must be a 1-D integer tensor or a sequence of ints, "
                            f"got a tensor of dtype {seeds.dtype} and shape {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds must be a sequence of ints, got {type(seeds).__name__}")
    out = []
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool):
            raise TypeError(f"seeds must contain ints, got {s!r} of type {type(s).__name__}")
        if not 0 <= s < 1 << 64:
            raise ValueError(f"seeds must lie in [0, 2**64), got {s}")
        out.append(s)
    if not out:
        raise ValueError("seeds must contain at least one seed, got an empty sequence")
    return out


class PerSampleNoise:
    r"""Unit Gaussian noise where sample $k$ depends only on its own seed (final class).

    ``noise(i)`` is the $\mathcal N(0, I)$ draw for sampler step $i$ (the ``noise`` callable that
    [`sdegen.solvers.base.integrate_fixed_grid`][sdegen.solvers.base.integrate_fixed_grid] accepts); ``noise.prior()`` is the unit-normal
    draw behind $x_T$ (the caller multiplies by ``sde.prior_std()``). Each is a pure function of
    (seed, stream, element index): calling twice gives the same tensor, and sample $k$ does not
    depend on the other seeds in the batch.

    Example::

        noise = PerSampleNoise([11, 12, 13], (3, 2))
        x_T = sde.prior_std() * noise.prior()
        z_0 = noise(0)                      # step 0
        assert torch.equal(PerSampleNoise([12], (1, 2))(0)[0], z_0[1])

    Args:
        seeds: one int per sample, each in ``[0, 2**64)`` (a list, tuple or 1-D integer tensor).
        shape: ``(B, *D)`` with ``B = len(seeds)``; may be left ``None`` and given per call.
        device: where draws are made (default CPU). They are bitwise equal across devices.
        dtype: floating dtype of the draws (default ``torch.get_default_dtype()``); computed in
            float64 and rounded.

    Raises:
        TypeError: ``seeds`` not integers, ``dtype`` not floating.
        ValueError: empty ``seeds``, a seed out of range, ``shape[0] != len(seeds)``.
    """

    def __init__(self, seeds, shape=None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        self._seeds = tuple(_check_seeds(seeds))
        self._shape = None if shape is None else _check_shape(shape, len(self._seeds))
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._dtype = dtype

    @classmethod
    def from_offset(cls, offset: int, batch: int, shape=None, *, device=None, dtype=None) -> "PerSampleNoise":
        """Seeds ``offset, offset + 1, ..., offset + batch - 1``: sample ``k`` of the batch is global
        sample ``offset + k``, so a rank that draws global indices ``[a, b)`` uses ``from_offset(a, b - a)``."""
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise TypeError(f"offset must be an int, got {type(offset).__name__}")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return cls(range(offset, offset + batch), shape, device=device, dtype=dtype)

    # ------------------------------------------------------------------ properties
    @property
    def seeds(self) -> tuple[int, ...]:
        """The per-sample seeds (length ``B``)."""
        return self._seeds

    @property
    def batch(self) -> int:
        return len(self._seeds)

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self._shape

    def __len__(self) -> int:
        return len(self._seeds)

    def __getitem__(self, index) -> "PerSampleNoise":
        """The noise of a sub-batch (an int, slice or list of indices), with the same draws."""
        if isinstance(index, int):
            index = [index]
        seeds = self._seeds[index] if isinstance(index, slice) else tuple(self._seeds[i] for i in index)
        shape = None if self._shape is None else (len(seeds), *self._shape[1:])
        return PerSampleNoise(seeds, shape, device=self._device, dtype=self._dtype)

    def __repr__(self) -> str:
        return f"PerSampleNoise(batch={self.batch}, shape={self._shape}, device={self._device}, dtype={self._dtype})"

    # ------------------------------------------------------------------ draws
    def prior(self, shape=None, device=None, dtype=None) -> Tensor:
        r"""Unit-normal draw for $x_T$ (stream "prior"), of ``shape`` (default: the constructor's)."""
        return self._normal((_TAG_PRIOR,), shape, device, dtype)

    def __call__(self, i: int, *, sub: int = 0, shape=None, device=None, dtype=None) -> Tensor:
        r"""Unit-normal draw $z_i$ for sampler step ``i`` (``sub`` numbers further draws in the same
        step, e.g. corrector iterations), shape ``(B, *D)``."""
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"i (the step index) must be a non-negative int, got {i!r}")
        if not isinstance(sub, int) or isinstance(sub, bool) or sub < 0:
            raise ValueError(f"sub must be a non-negative int, got {sub!r}")
        return self._normal((_TAG_STEP, i, sub), shape, device, dtype)

    def draw(self, *counters: int, shape=None, device=None, dtype=None) -> Tensor:
        """Unit-normal draw on a user stream named by non-negative int ``counters`` (e.g. Hutchinson
        probes), disjoint from the prior and step streams."""
        for c in counters:
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"counters must be non-negative ints, got {c!r}")
        return self._normal((_TAG_USER, *counters), shape, device, dtype)

    def _normal(self, counters: tuple[int, ...], shape, device, dtype) -> Tensor:
        shape = self._shape if shape is None else _check_shape(shape, self.batch)
        if shape is None:
            raise ValueError("shape must be given (here or to the constructor), got None")
        device = torch.device(device) if device is not None else self._device
        dtype = dtype or self._dtype or torch.get_default_dtype()
        B = shape[0]
        n = math.prod(shape[1:])
        pairs = (n + 1) // 2
        # Stream key per sample: hash the seed, then fold in each counter (hashed in Python, exactly).
        key = _mix(torch.tensor([_signed(s + _GAMMA) for s in self._seeds], dtype=torch.int64, device=device))
        for c in counters:
            key = _mix(key ^ _signed(splitmix64(c + 1)))
        # Word j of the stream: mix(key + (j+1) * gamma), j = 0 .. 2*pairs - 1.
        offs = torch.arange(1, 2 * pairs + 1, dtype=torch.int64, device=device) * _signed(_GAMMA)
        words = _mix(key[:, None] + offs[None, :]).reshape(B, pairs, 2)
        u = _srl(words, 11).to(torch.float64) * 2.0**-53          # exact: 53-bit integers
        radius = _sqrt(-2.0 * _log_unit(1.0 - u[..., 0]))     # 1 - u in (0, 1], exact
        cos, sin = _cos_sin_2pi(u[..., 1])
        z = torch.stack([radius * cos, radius * sin], dim=-1).reshape(B, 2 * pairs)[:, :n]
        return z.reshape(shape).to(dtype)
