"""How the TPU (Pallas Mosaic) kernels lay out the size-2L DFT, their constants and tiles.

The convolution of spec 3.3 is a size-N = 2L circular convolution of zero-padded signals. On a
TPU it runs as dense matmuls on the MXU, in one of two forms chosen by L:

* ``"dense"`` (L <= `MAX_DENSE_SEQ_LEN`): the real-input DFT as (L, L) matrices. A real signal's
  spectrum is Hermitian, so bins 0..L-1 plus the Nyquist bin L hold all of it; the Nyquist bin
  (real, like bin 0) is packed into the imaginary slot of bin 0, so a sequence's spectrum is
  exactly L complex values and every matmul is (rows, L) @ (L, L), with no reshape or transpose
  inside the kernel. The inverse is the transpose (`pack_spectrum` holds the scale factors).
* ``"monarch"`` (L >= `MIN_MONARCH_SEQ_LEN`): the order-2 Monarch factorisation of spec
  section 7 with N = N1 * 128. A sequence is viewed as an (R, 128) tile, R = L / 128 (a free
  reshape in HBM): the lane axis carries the 128-point DFTs as (rows, 128) @ (128, 128) matmuls,
  the sublane axis the N1 = 2R point DFTs, of which only the R non-zero input rows (and the R kept
  output rows) are computed.

The dense form costs 8 L FLOPs per token and channel per convolution and 3 L^2 constants;
Monarch costs 8 N1 + 32 * 128 FLOPs and 2 N1 R + 2 * 128 (N1 + 128) constants. The two cost the
same FLOPs at L = 512, where the dense form in float32 no longer fit v4's 16 MiB of VMEM (the
Mosaic compiler's figure, docs/perf.md TPU section): Monarch takes over there.

Kernel spectra are kept in the layout the forward stages leave a signal's spectrum in, with 1/N
(and the dense form's Hermitian factor 2) folded in, so the inverse needs no extra multiply; the
skip term ``D * x`` is a change of the lag-0 tap (as `dft_plan` does for the Triton kernel). The
spectra are computed by small Pallas kernels too: XLA's TPU FFT is slow, and XLA took tens of
seconds to compile the same transform written as float32 einsums.

Everything here is NumPy or elementwise XLA: the DFT factors are float64 NumPy constants rounded
once to float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

LANES = 128  # TPU vector lane width: the Monarch N2 and the alignment of every last dim.
SUBLANES = 8  # float32 sublanes: second-to-last block dims are multiples of this (or the full dim).
MIN_SEQ_LEN = 128
MAX_DENSE_SEQ_LEN = 384
MIN_MONARCH_SEQ_LEN = 512
MONARCH_SEQ_LEN_MULTIPLE = 4 * LANES  # R = L / 128 a multiple of 4: N1 = 2R fills sublane tiles
MAX_SEQ_LEN = 32768
# Elements (channels x positions) of one signal tile: 256 channels at L = 128, one at L = 32768.
# The Mosaic compiler reported 1.4-5.9 MiB of scoped VMEM per kernel for every supported L at
# H = 768 (benchmarks/tpu_aot_check.py), and the whole backward at L = 32768 in float32 fits v4's
# 16 MiB; `vmem_estimate_bytes` is a coarser bound the tests keep under 16 MiB.
TILE_ELEMENTS_FORWARD = 32768
TILE_ELEMENTS_BACKWARD = 16384


def supports(seq_len: int) -> bool:
    """True when the TPU kernel handles L.

    Dense form: L a multiple of 128 in [128, 384]. Monarch form: L a multiple of 512 in
    [512, 32768] (R = L / 128 rows, N1 = 2R a multiple of the 8 sublanes). Every power of two from
    128 to 32768 is covered; other lengths fall back to the XLA Monarch path.
    """
    if MIN_SEQ_LEN <= seq_len <= MAX_DENSE_SEQ_LEN:
        return seq_len % LANES == 0
    return (MIN_MONARCH_SEQ_LEN <= seq_len <= MAX_SEQ_LEN
            and seq_len % MONARCH_SEQ_LEN_MULTIPLE == 0)


@dataclasses.dataclass(frozen=True)
class TpuPlan:
    """The DFT form for one L.

    Attributes:
        seq_len: L.
        kind: ``"dense"`` or ``"monarch"``.
        n1: Monarch N1 = 2R (dense form: 0).
        rows: Monarch R = L / 128 (dense form: 0).
    """

    seq_len: int
    kind: str
    n1: int = 0
    rows: int = 0

    @property
    def n(self) -> int:
        return 2 * self.seq_len

    @property
    def num_spectrum_planes(self) -> int:
        """Real planes per filter spectrum: dense (kr, ki, kn), Monarch (kr, ki)."""
        return 3 if self.kind == "dense" else 2

    def signal_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        """The HBM view of a (B, H, L) signal the kernels read: (B, H, L) or (B, H, R, 128)."""
        if self.kind == "dense":
            return (batch, channels, self.seq_len)
        return (batch, channels, self.rows, LANES)

    def taps_shape(self, channels: int) -> tuple[int, ...]:
        """The view of the doubled (H, 2L) filter taps: (H, 2L) or (H, N1, 128)."""
        if self.kind == "dense":
            return (channels, self.n)
        return (channels, self.n1, LANES)

    def spectrum_shape(self, channels: int) -> tuple[int, ...]:
        """Shape of one spectrum plane: (H, L) dense, (H, N1, 128) Monarch."""
        if self.kind == "dense":
            return (channels, self.seq_len)
        return (channels, self.n1, LANES)


@functools.lru_cache(maxsize=None)
def make_plan(seq_len: int) -> TpuPlan:
    """The `TpuPlan` for L (see `supports`)."""
    if not supports(seq_len):
        raise ValueError(
            f"the Pallas Mosaic TPU long-conv kernel needs L a multiple of 128 in [{MIN_SEQ_LEN}, "
            f"{MAX_DENSE_SEQ_LEN}] or a multiple of 512 in [{MIN_MONARCH_SEQ_LEN}, "
            f"{MAX_SEQ_LEN}]; "
            f"got L = {seq_len}.")
    if seq_len <= MAX_DENSE_SEQ_LEN:
        return TpuPlan(seq_len=seq_len, kind="dense")
    rows = seq_len // LANES
    return TpuPlan(seq_len=seq_len, kind="monarch", n1=2 * rows, rows=rows)


# ---------------------------------------------------------------------------------------------
# Constants. Each kernel takes a named tuple of float32 planes (`constants(plan, role)`).

ROLES = ("block", "taps_to_spectrum", "spectrum_to_taps")


def _phase(numerator: np.ndarray, n: int) -> np.ndarray:
    # Reduce the integer phase mod n before scaling: exact for any size.
    return np.exp(-2j * np.pi * (np.mod(numerator, n) / n))


def _dense_forward_matrix(num_in: int, seq_len: int) -> np.ndarray:
    """(num_in, L) complex: columns 1..L-1 are DFT bins, column 0 packs bin 0 (real part) and the
    Nyquist bin L (imaginary part), both real for real inputs."""
    t = np.arange(num_in)
    w = _phase(np.outer(t, np.arange(seq_len)), 2 * seq_len)
    w.imag[:, 0] = np.where(t % 2 == 0, 1.0, -1.0)
    return w


@functools.lru_cache(maxsize=None)
def _np_constants(seq_len: int, role: str) -> tuple[tuple[str, np.ndarray], ...]:
    p = make_plan(seq_len)
    if p.kind == "dense":
        if role == "block":
            # Forward X = x @ (ar, ai); inverse y = Zr @ ar^T + Zi @ ai^T, and ar is symmetric.
            w = _dense_forward_matrix(p.seq_len, p.seq_len)
            named = (("ar", w.real), ("ai", w.imag), ("ai_t", w.imag.T))
        else:
            # The kernel's spectrum: (kr, ki) = k @ (er, ei) / N over all N taps; and back.
            w = _dense_forward_matrix(p.n, p.seq_len) / p.n
            named = ((("er", w.real), ("ei", w.imag)) if role == "taps_to_spectrum"
                     else (("er_t", w.real.T), ("ei_t", w.imag.T)))
    else:
        i1, i2 = np.arange(p.n1), np.arange(LANES)
        f1 = _phase(np.outer(i1, i1), p.n1)
        f2 = _phase(np.outer(i2, i2), LANES)
        tw = _phase(np.outer(i1, i2), p.n)
        shared = (("twr", tw.real), ("twi", tw.imag), ("f2r", f2.real), ("f2i", f2.imag))
        if role == "block":
            # Signals: only the R non-zero input rows enter stage 1, only R output rows are kept;
            # the inverse's conj(F_N1)[:R, :] is conj(f1)^T (F_N1 is symmetric).
            f1_cols = f1[:, :p.rows]
            named = (("f1r", f1_cols.real), ("f1i", f1_cols.imag)) + shared
        elif role == "taps_to_spectrum":  # all N taps, 1/N folded into stage 1
            named = (("f1r", f1.real / p.n), ("f1i", f1.imag / p.n)) + shared
        else:  # the adjoint: conjugate stages over all N1 rows, the same 1/N
            g1 = np.conj(f1) / p.n
            named = shared + (("g1r", g1.real), ("g1i", g1.imag))
    return tuple((name, np.ascontiguousarray(a, dtype=np.float32)) for name, a in named)


def constant_names(plan: TpuPlan, role: str) -> tuple[str, ...]:
    """Names of the constant planes of one kernel (``role`` in `ROLES`), in call order."""
    return tuple(name for name, _ in _np_constants(plan.seq_len, role))


def constants(plan: TpuPlan, role: str, dtype: jnp.dtype) -> tuple[Array, ...]:
    """The constants of one kernel as device arrays: matmul factors in ``dtype`` (the operand
    dtype), twiddles in float32 (applied on the VPU)."""
    return tuple(jnp.asarray(a, jnp.float32 if name.startswith("tw") else dtype)
                 for name, a in _np_constants(plan.seq_len, role))


def constant_bytes(plan: TpuPlan, role: str, operand_bytes: int) -> int:
    return sum(a.size * (4 if name.startswith("tw") else operand_bytes)
               for name, a in _np_constants(plan.seq_len, role))


# ---------------------------------------------------------------------------------------------
# Filter taps and spectrum planes (elementwise XLA, differentiable).


def doubled_taps(k_fwd_HxL: Array, k_rev_HxL: Array | None, d_H: Array | None,
                 plan: TpuPlan) -> Array:
    """``[k_fwd + D at lag 0, reverse(k_rev)]`` in float32, viewed as `plan.taps_shape(H)`.

    Spec 3.3: ``k[L + i] = k_rev[L - 1 - i]``, so lag -1 is k_rev[0] and lag 0 belongs to k_fwd
    alone; ``conv(x, k) + D * x`` is the convolution with ``k[0] + D``.
    """
    kf = k_fwd_HxL.astype(jnp.float32)
    if d_H is not None:
        kf = kf.at[:, 0].add(d_H.astype(jnp.float32))
    kr = jnp.zeros_like(kf) if k_rev_HxL is None else k_rev_HxL.astype(jnp.float32)
    return jnp.concatenate([kf, kr[:, ::-1]], axis=-1).reshape(plan.taps_shape(kf.shape[0]))


def pack_spectrum(planes: tuple[Array, Array], plan: TpuPlan) -> tuple[Array, ...]:
    """The block kernel's spectrum planes from the taps-to-spectrum kernel's (re, im) / N.

    Monarch: (re, im) as they are. Dense: the packed real-DFT planes (kr, ki, kn), each (H, L):
    the block kernel forms ``Zr = Xr kr - Xi ki``, ``Zi = Xr ki + Xi kn`` and returns
    ``Zr @ ar^T + Zi @ ai^T``, so column j >= 1 holds the Hermitian pair of bins j and N - j
    (``kr = kn = 2 Re K_j / N``, ``ki = 2 Im K_j / N``) and column 0 the two real bins
    (``kr = K_0 / N``, ``ki = 0``, ``kn = K_L / N``, the latter in ``im[:, 0]``).
    The adjoint convolution is the same with ki negated.
    """
    re, im = planes
    if plan.kind != "dense":
        return re, im
    first = jnp.arange(plan.seq_len) == 0
    return (jnp.where(first, re, 2.0 * re), jnp.where(first, 0.0, 2.0 * im),
            jnp.where(first, im, 2.0 * re))


def to_kernel_layout(x_BxHxL: Array, plan: TpuPlan) -> Array:
    """(B, H, L) -> `plan.signal_shape`: a free row-major reshape."""
    b, h, _ = x_BxHxL.shape
    return x_BxHxL.reshape(plan.signal_shape(b, h))


def from_kernel_layout(y: Array, plan: TpuPlan) -> Array:
    """Inverse of `to_kernel_layout`."""
    return y.reshape(y.shape[0], y.shape[1], plan.seq_len)


# ---------------------------------------------------------------------------------------------
# Tiles.


def channel_tile(channels: int, seq_len: int, elements: int, align: int) -> int:
    """Channels per program: a divisor of H near ``elements / seq_len`` that keeps blocks legal.

    The dense kernels' blocks are (channels, L): the tile must be a multiple of ``align`` (the
    sublane count of the block dtype) or all of H. The Monarch kernels' channel axis is a leading
    block dim (``align = 1``). `padded_channels` makes sure a legal tile exists.
    """
    target = max(1, elements // seq_len)
    if channels <= target:
        return channels
    for tile in range(target, 0, -1):
        if channels % tile == 0 and tile % align == 0:
            return tile
    raise ValueError(f"no channel tile of H = {channels} is a multiple of {align}; pad H first.")


def padded_channels(channels: int, seq_len: int, elements: int, align: int) -> int:
    """H rounded up so that `channel_tile` finds a legal tile (H itself when it already does)."""
    if channels <= max(1, elements // seq_len) or channels % align == 0:
        return channels
    return -(-channels // align) * align


def vmem_estimate_bytes(plan: TpuPlan, tile_channels: int, num_signals: int, num_outputs: int,
                        num_spectra: int, operand_bytes: int) -> int:
    """A rough upper bound of one block program's VMEM (the compiler's figures are lower).

    Counts double-buffered float32 signal, output and spectrum blocks, one copy of the constants,
    and 12 tile-sized complex float32 intermediates (both planes).
    """
    tile = tile_channels * plan.seq_len
    spec = tile_channels * int(np.prod(plan.spectrum_shape(1)))
    complex_tile = 2 * tile_channels * int(np.prod(plan.spectrum_shape(1)))
    return (2 * 4 * tile * (num_signals + num_outputs) + 2 * 4 * spec * num_spectra
            + constant_bytes(plan, "block", operand_bytes) + 12 * 4 * complex_tile)
