"""The synthetic generator's randomness (:mod:`raylsm.data.synth`): counter-based, not sequential.

Every draw is a SplitMix64 hash of ``(seed, stream, key)``, so a value depends only on what it is
drawn for (a user, a behaviour number, a row), never on the order in which values are generated.
"""

from __future__ import annotations

import numpy as np

# Hash streams (independent random sources).
S_SESSION, S_MIX, S_BEHAVIOUR, S_TARGET, S_ROW_USER, S_ROW_TS, S_ROW_CAND, S_ROW_LABEL = range(1, 9)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def salt(seed: int, stream: int) -> np.uint64:
    """A 64-bit salt for one (seed, stream) pair (SplitMix64 of a Python int)."""
    z = (seed * 0x2545F4914F6CDD1D + stream * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return np.uint64(z ^ (z >> 31))


def hash64(key: np.ndarray, salt: np.uint64) -> np.ndarray:
    """SplitMix64 finaliser of ``key ^ salt`` (uint64, element-wise); a counter-based RNG."""
    z = np.bitwise_xor(key.astype(np.uint64, copy=False), salt)
    z += _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def pack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pack (a < 2**31, b < 2**32) into one uint64 key."""
    return (a.astype(np.uint64) << np.uint64(32)) | b.astype(np.uint64)


def bits(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    """``width`` bits of ``h`` starting at bit ``shift``, as int64."""
    return ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).view(np.int64)


def below(x: np.ndarray, width: int, n: int) -> np.ndarray:
    """Map uniform ``width``-bit ints to uniform-ish ints in [0, n) (multiply-shift, no division)."""
    return (x * n) >> width


def unit(h: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
