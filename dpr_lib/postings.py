"""Compressed BM25 postings and the pruned top-k scorer over them (numba kernels).

**Layout.** A term's postings (rows ascending, with term frequencies) are cut into blocks of
:data:`BLOCK` postings. A block stores its rows as gaps (the first one from the previous block's
last row + 1, the others minus 1) and its ``tf - 1`` values, each bit-packed at the block's own
width into one run of uint32 words. Per block: the last row (skipping needs no decoding), the word
offset, the count, the two widths, the largest tf and the smallest document length among its
postings (the score bound), and a 32-bit FNV-1a checksum of its words (a corrupted block is refused
when it is decoded, naming the file). Per term: its first block (``term_blocks``).

**Safe bounds across deltas.** A block stores no score, only ``tf_max`` and ``dl_min``; its bound
``w * tf_max / (tf_max + k1 (1 - b + b dl_min / avgdl))`` is computed at query time from the
version's *current* statistics (df, N, avgdl). BM25's term weight grows with tf and shrinks with
the document length, so the bound holds for every posting of the block under any statistics: a
delta that changes N, df or avgdl never makes a stored bound unsafe, and nothing is recomputed.

**Exactness.** The pruned scorer (MaxScore: terms sorted by their upper bound; the terms whose
bounds together cannot reach the current k-th score are only probed, by block skipping and block
bounds, for documents the others found) computes each contribution exactly as the exhaustive
scorer does (float32 ``w tf / (tf + norm)``), sums a document's contributions in query-term order
in float64 and rounds to float32, and breaks ties by row (= pid order in a shard). A document is
skipped only when its bound, inflated by :data:`SLACK`, is below the k-th score: the top k equal
the exhaustive scorer's, ties included.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 128
SLACK = 1.0 + 1e-5
"""Relative margin on every bound: float32 contributions and float64 sums in another order can
exceed a float64 bound by ~1e-7 relative; a skipped document is below the k-th score by more."""
BIG = np.int64(1) << 40
BLOCK_ARRAYS = ("term_blocks", "block_last", "block_words", "block_n", "block_wrow", "block_wtf",
                "block_tfmax", "block_dlmin", "block_check", "packed")

# ---------------------------------------------------------------- bit packing


@njit(cache=True)
def _bits(x):
    n = 0
    while x > 0:
        n += 1
        x >>= 1
    return n


@njit(cache=True)
def _put(packed, bitpos, value, width):
    if width == 0:
        return
    word, off = bitpos >> 5, bitpos & 31
    v = np.uint64(value)
    packed[word] |= np.uint32((v << np.uint64(off)) & np.uint64(0xFFFFFFFF))
    if off + width > 32:
        packed[word + 1] |= np.uint32(v >> np.uint64(32 - off))


@njit(cache=True)
def _get(packed, bitpos, width):
    if width == 0:
        return np.int64(0)
    word, off = bitpos >> 5, bitpos & 31
    v = np.uint64(packed[word]) >> np.uint64(off)
    if off + width > 32:
        v |= np.uint64(packed[word + 1]) << np.uint64(32 - off)
    return np.int64(v & ((np.uint64(1) << np.uint64(width)) - np.uint64(1)))


@njit(cache=True)
def _checksum(packed, w0, w1, last, n):
    """FNV-1a (32 bit) over a block's words, its last row and its count."""
    mask, prime = np.uint64(0xFFFFFFFF), np.uint64(16777619)
    h = np.uint64(2166136261)
    for w in range(w0, w1):
        h = ((h ^ np.uint64(packed[w])) * prime) & mask
    h = ((h ^ (np.uint64(last) & mask)) * prime) & mask
    return ((h ^ np.uint64(n)) * prime) & mask


# ---------------------------------------------------------------- encoding


@njit(cache=True)
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


@njit(cache=True)
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


def encode(offsets: np.ndarray, rows: np.ndarray, tf: np.ndarray, doc_len: np.ndarray) -> dict[str, np.ndarray]:
    """An uncompressed inverted index (``offsets`` [terms + 1], ``rows``, ``tf`` >= 1) -> the block
    arrays of the module doc."""
    offsets, rows = np.asarray(offsets, np.int64), np.asarray(rows, np.int64)
    tf, doc_len = np.asarray(tf, np.int64), np.asarray(doc_len)
    nterms = len(offsets) - 1
    nblocks = int(((np.diff(offsets) + BLOCK - 1) // BLOCK).sum())
    out = (np.zeros(nterms + 1, np.uint32), np.zeros(nblocks, np.int32), np.zeros(nblocks + 1, np.int64),
           np.zeros(nblocks, np.uint8), np.zeros(nblocks, np.uint8), np.zeros(nblocks, np.uint8),
           np.zeros(nblocks, np.uint16), np.zeros(nblocks, doc_len.dtype))
    if len(rows) >= 2**32 or nblocks >= 2**32:
        raise ValueError(f"a sparse shard of {len(rows)} postings is beyond this format (2^32): use more shards")
    words = _plan(offsets, rows, np.minimum(tf, 65535), doc_len.astype(np.int64), out)
    packed, check = np.zeros(words + 1, np.uint32), np.zeros(nblocks, np.uint32)  # +1: a read may touch one past
    _pack(offsets, rows, tf, out[0], out[2], out[3], out[4], out[5], out[1], packed, check)
    names = ("term_blocks", "block_last", "block_words", "block_n", "block_wrow", "block_wtf", "block_tfmax",
             "block_dlmin")
    return {**dict(zip(names, out)), "block_check": check, "packed": packed}


# ---------------------------------------------------------------- decoding


@njit(cache=True)
def _decode(j, first, packed, block_words, block_n, wrow, wtf, block_last, check, out_rows, out_tf):
    """Block ``j`` (``first``: whether it is its term's first) into the buffers; False when its
    checksum or its last row disagree with the block table (corruption)."""
    n, wr, wt = np.int64(block_n[j]), np.int64(wrow[j]), np.int64(wtf[j])
    w0, w1 = np.int64(block_words[j]), np.int64(block_words[j + 1])
    if n < 1 or n > BLOCK or w1 < w0 or w1 + 1 > len(packed) or \
            _checksum(packed, w0, w1, block_last[j], n) != np.uint64(check[j]):
        return False
    bit = w0 * 32
    row = np.int64(-1) if first else np.int64(block_last[j - 1])
    for p in range(n):
        row += _get(packed, bit + p * wr, wr) + 1
        out_rows[p] = row
        out_tf[p] = _get(packed, bit + n * wr + p * wt, wt) + 1
    return row == block_last[j]


@njit(cache=True)
def decode_terms(term_pos, blocks, rows, tfs):
    """Every posting of the given terms (positions in the term table; ``blocks``: the arrays of
    :data:`BLOCK_ARRAYS`), in order, into ``rows``/``tfs``; returns -1, or the corrupted block."""
    buf_r, buf_t = np.empty(BLOCK, np.int64), np.empty(BLOCK, np.int64)
    at = 0
    for t in term_pos:
        for j in range(blocks[0][t], blocks[0][t + 1]):
            if not _decode(j, j == blocks[0][t], blocks[9], blocks[2], blocks[3], blocks[4], blocks[5], blocks[1],
                           blocks[8], buf_r, buf_t):
                return np.int64(j)
            n = blocks[3][j]
            rows[at:at + n] = buf_r[:n]
            tfs[at:at + n] = buf_t[:n]
            at += n
    return np.int64(-1)


# ---------------------------------------------------------------- scoring


@njit(cache=True)
def _contrib(w32, tf, dl, k1, omb, bavg):
    """One posting's BM25 term score, in float32 as the exhaustive scorer computes it."""
    t = np.float32(tf)
    norm = k1 * (omb + bavg * np.float32(dl))
    return (w32 * t) / (t + norm)


@njit(cache=True)
def _block_bound(j, w, blocks, k1, omb, bavg):
    tfmax, dlmin = np.float64(blocks[6][j]), np.float64(blocks[7][j])
    return w * tfmax / (tfmax + k1 * (omb + bavg * dlmin))


@njit(cache=True)
def term_bounds(term_pos, weights, blocks, k1, omb, bavg):
    """Per query term: the largest block bound over its postings (float64, statistics of now)."""
    out = np.zeros(len(term_pos), np.float64)
    for i in range(len(term_pos)):
        for j in range(blocks[0][term_pos[i]], blocks[0][term_pos[i] + 1]):
            out[i] = max(out[i], _block_bound(j, np.float64(weights[i]), blocks, k1, omb, bavg))
    return out


@njit(cache=True)
def _load(i, j, first, blocks, dec, bufr, buft):
    if dec[i] == j:
        return True
    dec[i] = j
    return _decode(j, first, blocks[9], blocks[2], blocks[3], blocks[4], blocks[5], blocks[1], blocks[8],
                   bufr[i], buft[i])


@njit(cache=True)
def _worse(s1, r1, s2, r2):
    return s1 < s2 or (s1 == s2 and r1 > r2)


@njit(cache=True)
def _push(hs, hr, size, s, r):
    """Min-heap of the k best (root: the worst kept); returns the new size."""
    k = len(hs)
    if size == k:
        if not _worse(hs[0], hr[0], s, r):
            return size
        i = 0
        while True:  # sift the new entry down from the root
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
        return size
    i = size
    while i > 0 and _worse(s, r, hs[(i - 1) // 2], hr[(i - 1) // 2]):
        hs[i], hr[i] = hs[(i - 1) // 2], hr[(i - 1) // 2]
        i = (i - 1) // 2
    hs[i], hr[i] = s, r
    return size + 1


@njit(cache=True)
def _probe(i, d, tb0, cb, end, dec, pos, bufr, buft, blocks):
    """Non-essential term ``i``: the block that may hold row ``d`` (skipping by last rows, no
    decoding), or -1 past the end."""
    while cb[i] < end[i] and blocks[1][cb[i]] < d:
        cb[i] += 1
    return cb[i] if cb[i] < end[i] else -1


@njit(cache=True)
def _find(i, d, j, tb0, dec, pos, bufr, buft, blocks):
    """Row ``d`` in block ``j`` of term ``i``: its position or -1 (-2: a corrupted block)."""
    if dec[i] != j:
        if not _load(i, j, j == tb0[i], blocks, dec, bufr, buft):
            return -2
        pos[i] = 0
    while bufr[i, pos[i]] < d:
        pos[i] += 1
    return pos[i] if bufr[i, pos[i]] == d else -1


@njit(cache=True)
def _next(i, tb0, cb, end, dec, pos, cur, bufr, buft, blocks):
    """Move essential term ``i`` to its next posting; False on a corrupted block."""
    pos[i] += 1
    if pos[i] == blocks[3][cb[i]]:
        cb[i] += 1
        pos[i] = 0
        if cb[i] == end[i]:
            cur[i] = BIG
            return True
        if not _load(i, cb[i], False, blocks, dec, bufr, buft):
            return False
    cur[i] = bufr[i, pos[i]]
    return True


@njit(cache=True)
def topk_pruned(term_pos, weights, blocks, doc_len, dead, k, k1, omb, bavg):
    """The k best rows of one shard for one question (MaxScore over blocks, see the module doc).

    ``term_pos``: the question's terms' positions in the shard's term table, in query-term order,
    ``weights`` their float32 weights (count x idf); ``dead``: uint8 per row (1 = tombstoned) or
    empty; ``k1``/``omb``/``bavg``: float32 k1, 1 - b and b / avgdl. Returns (scores float32, rows,
    count, bad block or -1)."""
    m = len(term_pos)
    hs, hr = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64)
    b64 = (np.float64(k1), np.float64(omb), np.float64(bavg))
    ms = term_bounds(term_pos, weights, blocks, b64[0], b64[1], b64[2])
    order = np.argsort(ms, kind="mergesort")  # ascending bounds: the first terms become non-essential
    tb0, cb, end = np.empty(m, np.int64), np.empty(m, np.int64), np.empty(m, np.int64)
    dec, pos, cur = np.full(m, -1, np.int64), np.zeros(m, np.int64), np.empty(m, np.int64)
    bufr, buft = np.empty((m, BLOCK), np.int64), np.empty((m, BLOCK), np.int64)
    prefix, w32 = np.cumsum(ms[order]), weights[order]
    for i in range(m):
        tb0[i] = cb[i] = blocks[0][term_pos[order[i]]]
        end[i] = blocks[0][term_pos[order[i]] + 1]
        if not _load(i, cb[i], True, blocks, dec, bufr, buft):
            return hs, hr, 0, cb[i]
        cur[i] = bufr[i, 0]
    vals, hit = np.zeros(m, np.float32), np.zeros(m, np.bool_)
    theta, e, size = -np.inf, 0, 0
    while e < m:
        d = BIG
        for i in range(e, m):
            d = min(d, cur[i])
        if d >= BIG:
            break
        partial = 0.0
        for i in range(e, m):
            if cur[i] == d:
                c = _contrib(w32[i], buft[i, pos[i]], doc_len[d], k1, omb, bavg)
                vals[order[i]], hit[order[i]] = c, True
                partial += c
                if not _next(i, tb0, cb, end, dec, pos, cur, bufr, buft, blocks):
                    return hs, hr, 0, cb[i]
        alive = True
        for i in range(e - 1, -1, -1):
            if (partial + prefix[i]) * SLACK < theta:
                alive = False
                break
            j = _probe(i, d, tb0, cb, end, dec, pos, bufr, buft, blocks)
            if j < 0:
                continue
            rest = prefix[i - 1] if i > 0 else 0.0
            if (partial + _block_bound(j, np.float64(w32[i]), blocks, b64[0], b64[1], b64[2]) + rest) * SLACK < theta:
                alive = False
                break
            p = _find(i, d, j, tb0, dec, pos, bufr, buft, blocks)
            if p == -2:
                return hs, hr, 0, j
            if p >= 0:
                c = _contrib(w32[i], buft[i, p], doc_len[d], k1, omb, bavg)
                vals[order[i]], hit[order[i]] = c, True
                partial += c
        if alive and (len(dead) == 0 or dead[d] == 0):
            s = 0.0
            for q in range(m):  # query-term order, as the exhaustive scorer sums
                if hit[q]:
                    s += np.float64(vals[q])
            size = _push(hs, hr, size, np.float32(s), d)
            if size == k:
                theta = np.float64(hs[0])
                while e < m and prefix[e] * SLACK < theta:
                    e += 1
        hit[:] = False
    idx = np.argsort(hr[:size], kind="mergesort")  # rows ascending, then scores descending (stable)
    idx = idx[np.argsort(-hs[:size][idx], kind="mergesort")]
    return hs[:size][idx], hr[:size][idx], size, -1
