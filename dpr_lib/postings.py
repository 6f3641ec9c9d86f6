"""Compressed BM25 postings and the pruned top-k scorer over them (numba kernels).

**Layout.** A term's postings (rows ascending, with term frequencies) are cut into blocks of
:data:`BLOCK` postings. A block stores its rows as gaps (the first one from the previous block's
last row + 1, the others minus 1) and its ``tf - 1`` values, each bit-packed at the block's own
width into one run of uint32 words. Per block: the last row (skipping needs no decoding), the word
offset, the count, the two widths, its largest term weight ``tf / (tf + k1 (1 - b + b dl / A))``
at the shard's own average length A (``block_smax``), its largest tf and smallest document length
(``block_tfmax``, ``block_dlmin``), and a 32-bit FNV-1a checksum of its words (a corrupted block
is refused when it is decoded, naming the file). Per term: its first block (``term_blocks``).

**Safe bounds across deltas.** A bound is ``idf x count x block weight``, computed at query time
from the version's *current* statistics: idf and count are multipliers, and the stored weight is
scaled by :func:`bound_scale` (max(1, A_now / A_built)), which bounds how far any posting's weight
can move when a delta changes the average length. Nothing stored is recomputed when a delta lands,
and no bound becomes unsafe. A file built with another k1 or b falls back to the tf/length bound.

**The scorer** (:func:`topk_pruned`) is block-max MaxScore over windows of :data:`WINDOW` rows (as
Lucene's MaxScore bulk scorer goes, and PISA's block-max MaxScore). Per window, a term's bound is
the largest of its blocks there; a window whose bounds sum below the k-th best score so far is
passed without decoding a block. Otherwise the lightest terms whose bounds together stay below it
are non-essential; the essential terms' postings in the window are accumulated into window-sized
arrays (they stay in cache), and each row they touch is completed by looking the non-essential
terms up (blocks passed by their last rows), dropped as soon as the terms left cannot lift it to
the k-th best. **Exactness:** a completed row's score is summed as the exhaustive scorer sums it
(float32 ``w tf / (tf + norm)`` per term, summed in query-term order in float64, rounded to
float32) into a heap of the k best, ties broken by row (= pid order in a shard); every bound is
inflated by :data:`SLACK` and rows are dropped only strictly below the k-th best: the top k equal
the exhaustive scorer's, ties included.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 128
WINDOW = 16384
"""Rows per window of the pruned scorer (measured best at 1.1M passages: 4,096 rows cost 10% more
per question in per-window work, 2,048 rows 25%). Its float64 accumulators (128 KB) stay in the
L2 cache; the per-term contributions (4 B per row and query term) are touched only at the rows
the essential terms hold."""
SLACK = 1.0 + 1e-5
"""Relative margin on every bound: float32 contributions and float64 sums in another order can
exceed a float64 bound by ~1e-7 relative; a skipped document is below the k-th score by more."""
BLOCK_ARRAYS = ("term_blocks", "block_last", "block_words", "block_n", "block_wrow", "block_wtf",
                "block_tfmax", "block_dlmin", "block_check", "packed", "block_smax")

# ---------------------------------------------------------------- bit packing


@njit(cache=True, error_model="numpy")
def _bits(x):
    n = 0
    while x > 0:
        n += 1
        x >>= 1
    return n


@njit(cache=True, error_model="numpy")
def _put(packed, bitpos, value, width):
    if width == 0:
        return
    word, off = bitpos >> 5, bitpos & 31
    v = np.uint64(value)
    packed[word] |= np.uint32((v << np.uint64(off)) & np.uint64(0xFFFFFFFF))
    if off + width > 32:
        packed[word + 1] |= np.uint32(v >> np.uint64(32 - off))


@njit(cache=True, error_model="numpy")
def _checksum(packed, w0, w1, last, n):
    """FNV-1a (32 bit) over a block's words, its last row and its count."""
    mask, prime = np.uint64(0xFFFFFFFF), np.uint64(16777619)
    h = np.uint64(2166136261)
    for w in range(w0, w1):
        h = ((h ^ np.uint64(packed[w])) * prime) & mask
    h = ((h ^ (np.uint64(last) & mask)) * prime) & mask
    return ((h ^ np.uint64(n)) * prime) & mask


# ---------------------------------------------------------------- encoding


@njit(cache=True, error_model="numpy")
def _plan(offsets, rows, tf, doc_len, out):
    """Per block: count, last row, widths, tf max, dl min, word offset (``out``'s arrays)."""
    term_blocks, block_last, block_words, block_n, wrow, wtf, tfmax, dlmin = out
    nb, words = 0, 0
    for t in range(len(offsets) - 1):
        term_blocks[t] = nb
        start = offsets[t]
        while start < offsets[t + 1]:
            n = min(BLOCK, offsets[t + 1] - start)
            base = 0 if start == offsets[t] else rows[start - 1] + 1
            gap, tmax, dmin = rows[start] - base, 1, doc_len[rows[start]]
            for p in range(start, start + n):
                if p > start:
                    gap = max(gap, rows[p] - rows[p - 1] - 1)
                tmax = max(tmax, tf[p])
                dmin = min(dmin, doc_len[rows[p]])
            block_n[nb], block_last[nb] = n, rows[start + n - 1]
            wrow[nb], wtf[nb] = _bits(gap), _bits(tmax - 1)
            tfmax[nb], dlmin[nb], block_words[nb] = tmax, dmin, words
            words += (n * (wrow[nb] + wtf[nb]) + 31) // 32
            nb += 1
            start += n
    term_blocks[len(offsets) - 1] = nb
    block_words[nb] = words
    return words


@njit(cache=True, error_model="numpy")
def _pack(offsets, rows, tf, term_blocks, block_words, block_n, wrow, wtf, block_last, packed, check):
    for t in range(len(offsets) - 1):
        start = offsets[t]
        for j in range(term_blocks[t], term_blocks[t + 1]):
            n, wr, wt = np.int64(block_n[j]), np.int64(wrow[j]), np.int64(wtf[j])
            bit = np.int64(block_words[j]) * 32
            prev = -1 if j == term_blocks[t] else rows[start - 1]
            for p in range(n):
                _put(packed, bit + p * wr, rows[start + p] - prev - 1, wr)
                _put(packed, bit + n * wr + p * wt, tf[start + p] - 1, wt)
                prev = rows[start + p]
            check[j] = _checksum(packed, block_words[j], block_words[j + 1], block_last[j], n)
            start += n


def encode(offsets: np.ndarray, rows: np.ndarray, tf: np.ndarray, doc_len: np.ndarray, k1: float, b: float,
           avgdl: float) -> dict[str, np.ndarray]:
    """An uncompressed inverted index (``offsets`` [terms + 1], ``rows``, ``tf`` >= 1) -> the block
    arrays of the module doc; ``block_smax`` is each block's largest BM25 term weight (without idf)
    under k1, b and ``avgdl`` (the shard's own: see :func:`bound_scale`)."""
    offsets, rows = np.asarray(offsets, np.int64), np.asarray(rows, np.int64)
    tf, doc_len = np.minimum(np.asarray(tf, np.int64), 65535), np.asarray(doc_len)  # tf is stored in 16 bits
    nterms = len(offsets) - 1
    nblocks = int(((np.diff(offsets) + BLOCK - 1) // BLOCK).sum())
    out = (np.zeros(nterms + 1, np.uint32), np.zeros(nblocks, np.int32), np.zeros(nblocks + 1, np.int64),
           np.zeros(nblocks, np.uint8), np.zeros(nblocks, np.uint8), np.zeros(nblocks, np.uint8),
           np.zeros(nblocks, np.uint16), np.zeros(nblocks, doc_len.dtype))
    if len(rows) >= 2**32 or nblocks >= 2**32:
        raise ValueError(f"a sparse shard of {len(rows)} postings is beyond this format (2^32): use more shards")
    words = _plan(offsets, rows, tf, doc_len.astype(np.int64), out)
    packed, check = np.zeros(words + 1, np.uint32), np.zeros(nblocks, np.uint32)  # +1: a read may touch one past
    _pack(offsets, rows, tf, out[0], out[2], out[3], out[4], out[5], out[1], packed, check)
    t = tf.astype(np.float64)
    weight = t / (t + k1 * (1.0 - b + b * doc_len[rows].astype(np.float64) / max(avgdl, 1e-9)))
    starts = np.cumsum(out[3].astype(np.int64)) - out[3]
    smax = (np.maximum.reduceat(weight, starts) if nblocks else np.zeros(0)) * (1.0 + 1e-6)
    names = ("term_blocks", "block_last", "block_words", "block_n", "block_wrow", "block_wtf", "block_tfmax",
             "block_dlmin")
    return {**dict(zip(names, out)), "block_check": check, "packed": packed, "block_smax": smax.astype(np.float32)}


def bound_scale(built_avgdl: float, avgdl: float) -> float:
    """What turns a block's stored largest weight (at the shard's ``built_avgdl``) into a bound at
    the version's ``avgdl`` now. A term weight tf / (tf + k1 (1 - b) + k1 b dl / A) moves with A by
    the factor (tf + k1 (1 - b) + k1 b dl / A) / (tf + k1 (1 - b) + k1 b dl / A'), at most
    max(1, A' / A) for every tf and dl: a bound that stays safe whatever a delta does to the
    average length, and tight while it moves little."""
    return max(1.0, float(avgdl) / max(float(built_avgdl), 1e-9))


# ---------------------------------------------------------------- decoding


@njit(cache=True, error_model="numpy", inline="always")
def _decode(j, first, blocks, out_rows, out_tf, i, with_tf):
    """Block ``j`` of ``blocks`` (the arrays of :data:`BLOCK_ARRAYS`, then the per-block ``checked``
    bytes; ``first``: whether it is its term's first) into row ``i`` of the buffers: its rows, and
    its tf values when ``with_tf`` (:func:`_tf_at` reads single ones). False when the block's
    shape, its checksum or its last row disagree with the block table (corruption). The checksum
    is computed once per block and loaded index (``checked``): the files are read-only maps."""
    packed, block_last, checked = blocks[9], blocks[1], blocks[11]
    n, wr, wt = np.int64(blocks[3][j]), np.int64(blocks[4][j]), np.int64(blocks[5][j])
    w0, w1 = np.int64(blocks[2][j]), np.int64(blocks[2][j + 1])
    if checked[j] == 0:
        if n < 1 or n > BLOCK or w1 < w0 or w1 + 1 > len(packed) or n * (wr + wt) > (w1 - w0) * 32 or \
                _checksum(packed, w0, w1, block_last[j], n) != np.uint64(blocks[8][j]):
            return False
        checked[j] = 1
    # each value read on its own from the two words holding it (unsigned indices: no negative-index
    # handling per load); only the rows' running sum is sequential
    bit = np.uint64(w0) * np.uint64(32)
    ur = np.uint64(wr)
    mask_r = (np.uint64(1) << ur) - np.uint64(1)
    row = np.int64(-1) if first else np.int64(block_last[j - 1])
    for p in range(n):
        at = bit >> np.uint64(5)
        v = (np.uint64(packed[at]) | (np.uint64(packed[at + np.uint64(1)]) << np.uint64(32))) >> (bit & np.uint64(31))
        row += np.int64(v & mask_r) + 1
        out_rows[i, p] = row
        bit += ur
    if row != block_last[j]:
        checked[j] = 0
        return False
    if not with_tf:
        return True
    ut = np.uint64(wt)
    mask_t = (np.uint64(1) << ut) - np.uint64(1)
    for p in range(n):
        at = bit >> np.uint64(5)
        v = (np.uint64(packed[at]) | (np.uint64(packed[at + np.uint64(1)]) << np.uint64(32))) >> (bit & np.uint64(31))
        out_tf[i, p] = np.int64(v & mask_t) + 1
        bit += ut
    return True


@njit(cache=True, error_model="numpy", inline="always")
def _tf_at(packed, w0, n, wr, wt, p):
    """The tf of posting ``p`` of a block (words from ``w0``, ``n`` postings, widths ``wr``/``wt``),
    read alone from the (at most) two words holding it."""
    bit = w0 * 32 + n * wr + p * wt
    at = bit >> 5
    v = (np.uint64(packed[at]) | (np.uint64(packed[at + 1]) << np.uint64(32))) >> np.uint64(bit & 31)
    return np.int64(v & ((np.uint64(1) << np.uint64(wt)) - np.uint64(1))) + 1


@njit(cache=True, error_model="numpy")
def decode_terms(term_pos, blocks, rows, tfs):
    """Every posting of the given terms (positions in the term table; ``blocks``: the arrays of
    :data:`BLOCK_ARRAYS`, then the per-block ``checked`` bytes, as :func:`_decode` takes them), in
    order, into ``rows``/``tfs``; returns -1, or the corrupted block."""
    buf_r, buf_t = np.empty((1, BLOCK), np.int64), np.empty((1, BLOCK), np.int64)
    at = 0
    for t in term_pos:
        for j in range(blocks[0][t], blocks[0][t + 1]):
            if not _decode(j, j == blocks[0][t], blocks, buf_r, buf_t, 0, True):
                return np.int64(j)
            n = blocks[3][j]
            rows[at:at + n] = buf_r[0, :n]
            tfs[at:at + n] = buf_t[0, :n]
            at += n
    return np.int64(-1)


# ---------------------------------------------------------------- scoring


@njit(cache=True, error_model="numpy", inline="always")
def _contrib(w32, tf, norm):
    """One posting's BM25 term score, in float32 as the exhaustive scorer computes it (``norm``:
    the row's float32 k1 (1 - b + b dl / avgdl), see :func:`norms`)."""
    t = np.float32(tf)
    return (w32 * t) / (t + norm)


def norms(doc_len: np.ndarray, k1: np.float32, omb: np.float32, bavg: np.float32) -> np.ndarray:
    """Per row, the length part of BM25 in float32, computed as the exhaustive scorer computes it."""
    return k1 * (omb + bavg * np.asarray(doc_len).astype(np.float32))


@njit(cache=True, error_model="numpy", inline="always")
def _block_bound(j, w, blocks, k1, omb, bavg, scale):
    """Block ``j``'s largest possible contribution: its stored largest weight times ``scale``
    (:func:`bound_scale`), or, with ``scale`` 0 (k1 or b not those the file was built with), the
    bound from its largest tf and smallest length, safe under any statistics."""
    if scale > 0:
        return w * np.float64(blocks[10][j]) * scale
    tfmax, dlmin = np.float64(blocks[6][j]), np.float64(blocks[7][j])
    return w * tfmax / (tfmax + k1 * (omb + bavg * dlmin))


# ---------------------------------------------------------------- the pruned scorer
# Per-term cursor state, one column per query term (``st``): ``CUR`` the first block not wholly
# behind the scan, ``END`` one past the term's last block, ``FIRST`` its first block, ``DEC`` the
# block held decoded in the term's row of the buffers (-1: none), ``POS`` the posting the scan
# reached in it, ``TFS`` whether its tf values are decoded too (lookups read single ones). The
# kernels below take arrays by reference count (an atomic increment and decrement per array per
# call, inlined or not), so the per-posting and per-row work stays inside a few calls per window.
CUR, END, FIRST, DEC, POS, TFS = 0, 1, 2, 3, 4, 5
_DEBRUIJN = np.array([0, 1, 48, 2, 57, 49, 28, 3, 61, 58, 50, 42, 38, 29, 17, 4, 62, 55, 59, 36, 53, 51, 43, 22, 45,
                      39, 33, 30, 24, 18, 12, 5, 63, 47, 56, 27, 60, 41, 37, 16, 54, 35, 52, 21, 44, 32, 23, 11, 46,
                      26, 40, 15, 34, 20, 31, 10, 25, 14, 19, 9, 13, 8, 7, 6], np.int64)
"""The position of a 64-bit word's lowest set bit, by De Bruijn multiplication (0x03f79d71b4cb0a89)."""


@njit(cache=True, error_model="numpy", inline="always")
def _hold(i, j, st, blocks, bufr, buft, with_tf):
    """Block ``j`` decoded into term ``i``'s buffers, with its tf values or not (callers test
    ``st[DEC, i]`` and ``st[TFS, i]`` first: a call costs a reference count per array); False:
    corrupted."""
    if not _decode(j, j == st[FIRST, i], blocks, bufr, buft, i, with_tf):
        return False
    st[DEC, i], st[POS, i], st[TFS, i] = j, 0, 1 if with_tf else 0
    return True


EXACT_BLOCKS = 4
"""A term of at most this many blocks in a shard (the rare terms, which weigh most) is decoded
whole to give each window its largest actual contribution there; longer ones give their blocks'
stored bounds."""


@njit(cache=True, error_model="numpy")
def _window_bounds(st, blocks, w64, w32, dl, table, k1, omb, bavg, scale, window, wb, bufr, buft):
    """``wb[w, i]``: at least the largest contribution term ``i`` makes to a row of window ``w``
    (rows [w window, (w + 1) window)); 0 where it holds none. Returns the corrupted block or -1."""
    last, count = blocks[1], blocks[3]
    for i in range(len(w64)):
        j0, j1 = st[FIRST, i], st[END, i]
        if j1 - j0 <= EXACT_BLOCKS:
            for j in range(j0, j1):
                if not _hold(i, j, st, blocks, bufr, buft, True):
                    return j
                for p in range(np.int64(count[j])):
                    r = bufr[i, p]
                    w = r // window
                    wb[w, i] = max(wb[w, i], np.float64(_contrib(w32[i], buft[i, p], table[dl[r]])))
            continue
        for j in range(j0, j1):
            bound = _block_bound(j, w64[i], blocks, k1, omb, bavg, scale)
            for w in range(0 if j == j0 else (np.int64(last[j - 1]) + 1) // window, np.int64(last[j]) // window + 1):
                wb[w, i] = max(wb[w, i], bound)
    return np.int64(-1)


@njit(cache=True, error_model="numpy", inline="always")
def _split(lo, theta, st, blocks, wmax, order, essential):
    """Window ``lo``: each term's current block moved to its first one not wholly below ``lo``
    (windows come in row order: cursors only move forward). The terms ordered by their bound there
    (``wmax``), ascending (``order``): the longest prefix whose bounds sum below ``theta`` is
    non-essential (a row only they hold cannot reach the top k), the rest marked in ``essential``.
    Returns the prefix's length and its bound."""
    n, last = len(wmax), blocks[1]
    for i in range(n):
        j = st[CUR, i]
        while j < st[END, i] and last[j] < lo:
            j += 1
        st[CUR, i] = j
        y = i  # insertion sort: a question has a handful of terms
        while y > 0 and wmax[order[y - 1]] > wmax[i]:
            order[y] = order[y - 1]
            y -= 1
        order[y] = i
    ne, rest = 0, 0.0
    while ne < n and (rest + wmax[order[ne]]) * SLACK < theta:
        rest += wmax[order[ne]]
        ne += 1
    for x in range(n):
        essential[order[x]] = x >= ne
    return ne, rest


@njit(cache=True, error_model="numpy", inline="always")
def _accumulate(lo, hi, st, blocks, dl, table, w32, essential, acc, cm, bits, bufr, buft):
    """Every posting of the essential terms in rows [lo, hi) into the window's accumulators
    (``acc``, and ``cm[off, i]`` term i's own contributions), each row's first one marking its bit in
    ``bits``. Returns the corrupted block, or -1."""
    last, count = blocks[1], blocks[3]
    for i in range(len(w32)):
        if not essential[i]:
            continue
        j = st[CUR, i]
        while j < st[END, i] and (j == st[FIRST, i] or last[j - 1] + 1 < hi):
            if (st[DEC, i] != j or st[TFS, i] == 0) and not _hold(i, j, st, blocks, bufr, buft, True):
                return j
            p, n = st[POS, i], np.int64(count[j])
            while p < n and bufr[i, p] < lo:
                p += 1
            while p < n and bufr[i, p] < hi:
                r = bufr[i, p]
                off = r - lo
                c = _contrib(w32[i], buft[i, p], table[dl[r]])
                if acc[off] == 0.0:  # every contribution is > 0: 0 means untouched
                    bits[off >> 6] |= np.uint64(1) << np.uint64(off & 63)
                acc[off] += np.float64(c)
                cm[off, i] = c
                p += 1
            st[POS, i] = p
            if p < n:
                break
            j += 1
        st[CUR, i] = j
    return np.int64(-1)


@njit(cache=True, error_model="numpy", inline="always")
def _touched(bits, offs):
    """The offsets whose bits are set, ascending, into ``offs`` (the bits cleared); their count."""
    m = 0
    magic = np.uint64(0x03F79D71B4CB0A89)
    for x in range(len(bits)):
        w = bits[x]
        while w != 0:
            low = w & (~w + np.uint64(1))
            offs[m] = (x << 6) + _DEBRUIJN[(low * magic) >> np.uint64(58)]
            m += 1
            w ^= low
        bits[x] = 0
    return m


@njit(cache=True, error_model="numpy", inline="always")
def _worse(s1, r1, s2, r2):
    return s1 < s2 or (s1 == s2 and r1 > r2)


@njit(cache=True, error_model="numpy")
def _push(hs, hr, hn, s, r):
    """(s, r) into the heap of the k best (root: the worst; ties go to the smaller row); returns the
    heap's size."""
    k = len(hs)
    if hn < k:  # sift up
        i = hn
        while i > 0 and _worse(s, r, hs[(i - 1) // 2], hr[(i - 1) // 2]):
            hs[i], hr[i] = hs[(i - 1) // 2], hr[(i - 1) // 2]
            i = (i - 1) // 2
        hs[i], hr[i] = s, r
        return hn + 1
    if not _worse(hs[0], hr[0], s, r):
        return hn
    i = 0  # replace the root, sift down
    while True:
        c = 2 * i + 1
        if c >= k:
            break
        if c + 1 < k and _worse(hs[c + 1], hr[c + 1], hs[c], hr[c]):
            c += 1
        if not _worse(hs[c], hr[c], s, r):
            break
        hs[i], hr[i] = hs[c], hr[c]
        i = c
    hs[i], hr[i] = s, r
    return hn


@njit(cache=True, error_model="numpy", inline="always")
def _complete(lo, offs, m, ne, rest, theta, theta0, order, essential, wmax, st, blocks, dl, table, w32, acc, cm,
              cn, dead, bufr, buft, hs, hr, hn):
    """The window's touched rows (``offs[:m]``, ascending offsets from ``lo``) that may reach
    ``theta``, completed: the non-essential terms looked up heaviest first (blocks ending below the
    row are passed by their last rows, never decoded), a row given up once the terms left cannot
    lift it to ``theta``; a completed row is summed as the exhaustive scorer sums (float32
    contributions in query-term order, in float64, rounded to float32) and offered to the heap
    (``hs``/``hr``, ``hn`` entries). The window's accumulators are zeroed on the way. Returns (heap
    size, theta, corrupted block or -1)."""
    last, words, count, wrow, wtf, packed = blocks[1], blocks[2], blocks[3], blocks[4], blocks[5], blocks[9]
    k, nq = len(hs), len(w32)
    for x in range(m):
        off = offs[x]
        r, s, left = lo + off, acc[off], rest
        acc[off] = 0.0
        if (s + left) * SLACK < theta or (len(dead) > 0 and dead[r] != 0):
            for i in range(nq):
                cm[off, i] = 0.0
            continue
        for y in range(ne - 1, -1, -1):
            i = order[y]
            left -= wmax[i]
            j, c = st[CUR, i], np.float32(0)
            while j < st[END, i] and last[j] < r:
                j += 1
            st[CUR, i] = j
            if j < st[END, i]:  # the block that would hold r: earlier ones end below it
                if st[DEC, i] != j and not _hold(i, j, st, blocks, bufr, buft, False):
                    return hn, theta, j
                p = st[POS, i]
                while bufr[i, p] < r:
                    p += 1
                st[POS, i] = p
                if bufr[i, p] == r:
                    tf = buft[i, p] if st[TFS, i] else _tf_at(packed, np.int64(words[j]), np.int64(count[j]),
                                                             np.int64(wrow[j]), np.int64(wtf[j]), p)
                    c = _contrib(w32[i], tf, table[dl[r]])
            cn[i] = c
            s += np.float64(c)
            if (s + left) * SLACK < theta:
                break
        else:
            total = 0.0
            for i in range(nq):
                total += np.float64(cm[off, i] if essential[i] else cn[i])
            hn = _push(hs, hr, hn, np.float64(np.float32(total)), r)
            if hn == k:
                theta = max(theta0, hs[0])
        for i in range(nq):
            cm[off, i] = 0.0
    return hn, theta, np.int64(-1)


@njit(cache=True, error_model="numpy", nogil=True)
def topk_pruned(term_pos, weights, blocks, dl, table, dead, k, k1, omb, bavg, scale, theta0, acc, cmflat, bits):
    """The k best rows of one shard for one question, equal to the exhaustive scorer's: block-max
    MaxScore over windows of rows, as Lucene's MaxScore bulk scorer goes.

    Per window, each term's bound is the largest of its blocks there (of its postings, for a rare
    term: :func:`_window_bounds`); a window whose bounds sum below the k-th best score so far
    (``theta``) is passed undecoded. Otherwise the terms whose bounds together stay below
    ``theta`` are non-essential (:func:`_split`); the others' postings in the window are
    accumulated into window-sized arrays that stay in cache (:func:`_accumulate`), and each row
    they touch is completed by looking the non-essential terms up, given up as soon as it cannot
    reach ``theta`` (:func:`_complete`). Completed rows carry their exact score into a heap of the
    k best. ``theta0``: a score the k-th best is known to reach (other shards' results; -inf:
    none): rows below it are not returned. ``term_pos``: the question's terms' positions in the
    shard's term table in query-term order, ``weights`` their float32 weights; ``dl``: per row, its
    length; ``table``: per length, :func:`norms` (a row's length part of BM25: read through its
    2-byte length, half the memory traffic of a float per row); ``dead``: uint8 per row (1 =
    tombstoned) or empty; ``k1``/``omb``/``bavg``: float32 k1, 1 - b and b / avgdl (the bounds'
    fallback); ``scale``: see :func:`_block_bound`.
    Scratch, all zeros on entry and on a clean return (the caller keeps it per thread, so no
    question pays for zeroing it): ``acc`` float64 [window] (the window's length, a multiple of
    64), ``cmflat`` float32 [>= window x terms], ``bits`` uint64 [window / 64]. Returns (scores,
    rows, corrupted block or -1), best first, ties by row; after a corrupted block the scratch is
    left dirty."""
    nq, nrows = len(term_pos), len(dl)
    st = np.zeros((6, nq), np.int64)
    for i in range(nq):
        st[CUR, i] = st[FIRST, i] = blocks[0][term_pos[i]]
        st[END, i], st[DEC, i] = blocks[0][term_pos[i] + 1], -1
    w64, bufr, buft = weights.astype(np.float64), np.empty((nq, BLOCK), np.int64), np.empty((nq, BLOCK), np.int64)
    window = len(acc)
    offs, cm = np.empty(window, np.int64), cmflat[:window * nq].reshape((window, nq))
    order, essential, cn = np.empty(nq, np.int64), np.zeros(nq, np.bool_), np.zeros(nq, np.float32)
    hs, hr, hn, theta = np.empty(k, np.float64), np.empty(k, np.int64), 0, theta0
    wb = np.zeros(((nrows + window - 1) // window, nq))
    bad = _window_bounds(st, blocks, w64, weights, dl, table, np.float64(k1), np.float64(omb), np.float64(bavg), scale,
                         window, wb, bufr, buft)
    total = wb.sum(axis=1)
    for w in range(len(total)):
        if bad >= 0:
            break
        if total[w] == 0.0 or total[w] * SLACK < theta:
            continue
        lo = w * window
        hi = min(lo + window, nrows)
        wmax = wb[w]
        ne, rest = _split(lo, theta, st, blocks, wmax, order, essential)
        bad = _accumulate(lo, hi, st, blocks, dl, table, weights, essential, acc, cm, bits, bufr, buft)
        if bad >= 0:
            break
        hn, theta, bad = _complete(lo, offs, _touched(bits, offs), ne, rest, theta, theta0, order, essential, wmax,
                                   st, blocks, dl, table, weights, acc, cm, cn, dead, bufr, buft, hs, hr, hn)
    if bad >= 0:
        return np.empty(0, np.float32), np.empty(0, np.int64), bad
    idx = np.argsort(hr[:hn], kind="mergesort")  # rows ascending, then scores descending (stable)
    idx = idx[np.argsort(-hs[:hn][idx], kind="mergesort")]
    return hs[:hn][idx].astype(np.float32), hr[:hn][idx], np.int64(-1)
