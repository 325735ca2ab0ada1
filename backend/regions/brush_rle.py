"""Vectorised Label Studio brush RLE encoder.

`label_studio_sdk.converter.brush.mask2rle` builds its bit stream as a Python string, run by run
(then parses it back 8 bits at a time): its cost grows with the number of runs, from a few ms for
a smooth 768x1024 mask to ~0.4 s for a noisy one, and it dominated the refresh job. This module
produces exactly the same list of ints (byte-identical stream) with numpy, ~6-13x faster.

The format (`@thi.ng/rle-pack`, as the SDK's `encode_rle` writes it, big-endian bit order):
* header: 32-bit number of values, 5-bit (word size - 1) = 7, four 4-bit (rle size - 1) for the
  rle sizes [3, 4, 8, 16];
* per run of equal values (length L, value v), fields of flag bit, 2-bit rle-size index, length
  field (L - 1 in that many bits) and the 8-bit value:
    L == 1          -> flag 0 (a one-value literal), index 0, 3-bit 0
    2 <= L <= 8     -> flag 1, index 0,  3-bit L - 1
    9 <= L <= 16    -> flag 1, index 1,  4-bit L - 1
    17 <= L <= 256  -> flag 1, index 2,  8-bit L - 1
    L > 256         -> (L - 1) // 65536 repeats of length 65536, then one of the rest (1..65536),
                       all flag 1, index 3, 16-bit length - 1 (even when the rest is short);
* zero padding up to the next byte boundary, a whole zero byte when already aligned (the SDK
  always appends 8 - bits % 8 zeros).
"""
from __future__ import annotations

import numpy as np

_WORD_SIZE = 8
_RLE_SIZES = (3, 4, 8, 16)
_LONG_RUN = 1 << _RLE_SIZES[-1]  # longest run one field can hold (length field 65535)
_HEADER_TAIL = ((_WORD_SIZE - 1) << 16) | sum((s - 1) << (12 - 4 * k) for k, s in enumerate(_RLE_SIZES))


def _field_tables() -> tuple[np.ndarray, np.ndarray]:
    """Width and fixed high bits (flag, size index) of the field of a run, by min(run length, 257)."""
    length = np.arange(258)
    size_idx = np.searchsorted(np.array([8, 16, 256]), length)  # 257: a long run, 16-bit field
    widths = 3 + np.asarray(_RLE_SIZES)[size_idx] + _WORD_SIZE
    flag = length > 1  # a run of 1 is a one-value literal: flag 0, index 0, length field 0
    prefix = (flag.astype(np.int64) << (widths - 1)) | (size_idx << (widths - 3))
    return widths.astype(np.uint64), prefix.astype(np.uint64)


_WIDTHS, _PREFIX = _field_tables()


def _pack_fields(codes: np.ndarray, widths: np.ndarray) -> list[int]:
    """Concatenate bit fields (code i right-aligned in widths[i] <= 32 bits, MSB first) into bytes
    with the SDK's padding. Works on big-endian 64-bit words: a field lies in one word or straddles
    two; fields are in stream order, so those starting in a word are contiguous and OR-reduced
    together, and at most one field crosses each word boundary."""
    ends = np.cumsum(widths)
    offsets = ends - widths
    n_bytes = int(ends[-1]) // 8 + 1
    word = (offsets >> np.uint64(6)).astype(np.intp)
    bit = offsets & np.uint64(63)
    aligned = codes << (np.uint64(64) - widths)  # field at the top of a 64-bit word
    high = aligned >> bit
    out = np.zeros((n_bytes + 7) // 8, np.uint64)
    first = np.flatnonzero(np.diff(word, prepend=-1))
    out[word[first]] = np.bitwise_or.reduceat(high, first)
    cross = np.flatnonzero(bit + widths > np.uint64(64))  # then bit > 32: shifts stay in 1..31
    out[word[cross] + 1] |= aligned[cross] << (np.uint64(64) - bit[cross])
    return out.astype(">u8").view(np.uint8)[:n_bytes].tolist()


def _encode_runs(num: int, lengths: np.ndarray, values: np.ndarray) -> list[int]:
    """LS RLE of `num` 8-bit values given as consecutive runs (lengths >= 1, values 0..255)."""
    lengths = lengths.astype(np.uint64)
    values = values.astype(np.uint64)
    kind = np.minimum(lengths, np.uint64(257)).astype(np.intp)  # field layout follows the whole run
    seg_len = lengths
    if lengths.size and lengths.max() > _LONG_RUN:  # split into full 65536 fields plus the rest
        n_seg = np.where(kind == 257, (lengths - np.uint64(1)) // np.uint64(_LONG_RUN) + np.uint64(1),
                         np.uint64(1)).astype(np.intp)
        run = np.repeat(np.arange(len(lengths)), n_seg)
        seg_len = np.full(len(run), _LONG_RUN, np.uint64)
        last = np.cumsum(n_seg) - 1
        seg_len[last] = lengths - (n_seg - 1).astype(np.uint64) * np.uint64(_LONG_RUN)
        kind, values = kind[run], values[run]
    codes = _PREFIX[kind] | ((seg_len - np.uint64(1)) << np.uint64(_WORD_SIZE)) | values
    header_codes = np.array([num, _HEADER_TAIL], np.uint64)
    header_widths = np.array([32, 5 + 4 * len(_RLE_SIZES)], np.uint64)
    return _pack_fields(np.concatenate([header_codes, codes]), np.concatenate([header_widths, _WIDTHS[kind]]))


def _encode(values: np.ndarray, repeat: int = 1) -> list[int]:
    """LS RLE of the 1-D 8-bit `values`, each repeated `repeat` times (without materialising it)."""
    if len(values) == 0:
        return _encode_runs(0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
    lengths = repeat * np.diff(np.append(starts, len(values)))
    return _encode_runs(repeat * len(values), lengths, values[starts])


def encode_values(arr: np.ndarray) -> list[int]:
    """Same as the SDK's `encode_rle(arr)` for a 1-D array of 8-bit values (0..255)."""
    return _encode(np.asarray(arr).ravel())


def mask_to_ls_rle(mask: np.ndarray) -> list[int]:
    """LS brush RLE of a 2-D mask (bool, 0/1 or 0/255; any non-zero pixel is foreground).

    Identical to the SDK's `mask2rle(mask.astype(np.uint8) * 255)` for a boolean mask: every pixel
    becomes 4 RGBA values of 0 or 255. (A zero-size mask, on which the SDK fails, gives the header
    of an empty stream.)
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = mask.ravel() if mask.dtype == bool else mask.ravel() != 0
    return _encode(flat.astype(np.uint8) * np.uint8(255), repeat=4)  # RGBA: every pixel 4 times
