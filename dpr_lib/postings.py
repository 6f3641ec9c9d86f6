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

**The scorer** (:func:`topk_pruned`) goes term at a time, heaviest bound first, into per-shard
accumulators. Once the bounds of the terms still to come cannot lift an untouched row to the k-th
accumulator (MaxScore's split of essential and non-essential terms), only the touched rows they
could still lift there stay candidates, and the remaining terms update those alone, decoding only
the blocks holding one. **Exactness:** the rows near the k-th accumulator are rescored exactly as
the exhaustive scorer scores (float32 ``w tf / (tf + norm)`` per term, summed in query-term order
in float64, rounded to float32), ties broken by row (= pid order in a shard); every bound is
inflated by :data:`SLACK`: the top k equal the exhaustive scorer's, ties included.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 128
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


@njit(cache=True, error_model="numpy")
def _decode(j, first, packed, block_words, block_n, wrow, wtf, block_last, check, out_rows, out_tf):
    """Block ``j`` (``first``: whether it is its term's first) into the buffers; False when its
    checksum or its last row disagree with the block table (corruption)."""
    n, wr, wt = np.int64(block_n[j]), np.int64(wrow[j]), np.int64(wtf[j])
    w0, w1 = np.int64(block_words[j]), np.int64(block_words[j + 1])
    if n < 1 or n > BLOCK or w1 < w0 or w1 + 1 > len(packed) or \
            _checksum(packed, w0, w1, block_last[j], n) != np.uint64(check[j]):
        return False
    # one pass over the words: a 64-bit reader refilled 32 bits at a time
    acc, have, at = np.uint64(0), np.int64(0), w0
    mask_r = (np.uint64(1) << np.uint64(wr)) - np.uint64(1)
    row = np.int64(-1) if first else np.int64(block_last[j - 1])
    for p in range(n):
        if have < wr:
            acc |= np.uint64(packed[at]) << np.uint64(have)
            at += 1
            have += 32
        row += np.int64(acc & mask_r) + 1
        acc >>= np.uint64(wr)
        have -= wr
        out_rows[p] = row
    mask_t = (np.uint64(1) << np.uint64(wt)) - np.uint64(1)
    for p in range(n):
        if have < wt:
            acc |= np.uint64(packed[at]) << np.uint64(have)
            at += 1
            have += 32
        out_tf[p] = np.int64(acc & mask_t) + 1
        acc >>= np.uint64(wt)
        have -= wt
    return row == block_last[j]


@njit(cache=True, error_model="numpy", inline="always")
def _read_block(j, first, blocks, out_rows, out_tf):
    """:func:`_decode` of block ``j`` of ``blocks`` (the arrays of :data:`BLOCK_ARRAYS`)."""
    return _decode(j, first, blocks[9], blocks[2], blocks[3], blocks[4], blocks[5], blocks[1], blocks[8], out_rows,
                   out_tf)


@njit(cache=True, error_model="numpy")
def decode_terms(term_pos, blocks, rows, tfs):
    """Every posting of the given terms (positions in the term table; ``blocks``: the arrays of
    :data:`BLOCK_ARRAYS`), in order, into ``rows``/``tfs``; returns -1, or the corrupted block."""
    buf_r, buf_t = np.empty(BLOCK, np.int64), np.empty(BLOCK, np.int64)
    at = 0
    for t in term_pos:
        for j in range(blocks[0][t], blocks[0][t + 1]):
            if not _read_block(j, j == blocks[0][t], blocks, buf_r, buf_t):
                return np.int64(j)
            n = blocks[3][j]
            rows[at:at + n] = buf_r[:n]
            tfs[at:at + n] = buf_t[:n]
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


@njit(cache=True, error_model="numpy")
def term_bounds(term_pos, weights, blocks, k1, omb, bavg, scale):
    """Per query term: the largest block bound over its postings (float64, statistics of now)."""
    out = np.zeros(len(term_pos), np.float64)
    for i in range(len(term_pos)):
        for j in range(blocks[0][term_pos[i]], blocks[0][term_pos[i] + 1]):
            out[i] = max(out[i], _block_bound(j, np.float64(weights[i]), blocks, k1, omb, bavg, scale))
    return out


@njit(cache=True, error_model="numpy")
def _or_term(t, w32, blocks, norm, acc, touched, n, bufr, buft):
    """Every posting of term ``t`` added to the accumulators, new rows appended to ``touched``.
    Returns (touched count, corrupted block or -1)."""
    for j in range(blocks[0][t], blocks[0][t + 1]):
        if not _read_block(j, j == blocks[0][t], blocks, bufr, buft):
            return n, np.int64(j)
        for p in range(np.int64(blocks[3][j])):
            r = bufr[p]
            if acc[r] == 0.0:  # every contribution is > 0: 0 means untouched
                touched[n] = r
                n += 1
            acc[r] += np.float64(_contrib(w32, buft[p], norm[r]))
    return n, np.int64(-1)


@njit(cache=True, error_model="numpy")
def _and_term(t, w32, blocks, norm, acc, cand, bufr, buft):
    """Term ``t``'s contributions to the candidate rows ``cand`` (ascending) only: blocks without a
    candidate are passed by their last rows, never decoded. Returns the corrupted block or -1."""
    j, jend, dec, p = np.int64(blocks[0][t]), np.int64(blocks[0][t + 1]), np.int64(-1), 0
    for r in cand:
        while j < jend and blocks[1][j] < r:
            j += 1
        if j == jend:
            break
        if dec != j:
            if not _read_block(j, j == blocks[0][t], blocks, bufr, buft):
                return j
            dec, p = j, 0
        while bufr[p] < r:
            p += 1
        if bufr[p] == r:
            acc[r] += np.float64(_contrib(w32, buft[p], norm[r]))
    return np.int64(-1)


@njit(cache=True, error_model="numpy")
def _kth(vals, k):
    """The k-th largest of ``vals`` (-inf when fewer than k): one pass keeping the k largest in a
    min-heap (most values compare once with its root)."""
    heap, size = np.full(k, -np.inf), 0
    for v in vals:
        if size == k and v <= heap[0]:
            continue
        if size < k:  # sift up
            i = size
            size += 1
            while i > 0 and heap[(i - 1) // 2] > v:
                heap[i] = heap[(i - 1) // 2]
                i = (i - 1) // 2
            heap[i] = v
            continue
        i = 0  # replace the root, sift down
        while True:
            c = 2 * i + 1
            if c >= k:
                break
            if c + 1 < k and heap[c + 1] < heap[c]:
                c += 1
            if heap[c] >= v:
                break
            heap[i] = heap[c]
            i = c
        heap[i] = v
    return heap[0] if size == k else -np.inf


@njit(cache=True, error_model="numpy")
def _gather(acc, rows, n, dead, reset):
    """The live rows among ``rows[:n]`` and their accumulators, compactly (``reset``: zero the
    accumulators on the way, saving a second pass over scattered memory)."""
    out_r, out_v, m = np.empty(n, np.int64), np.empty(n, np.float64), 0
    for x in range(n):
        r = rows[x]
        v = acc[r]
        if reset:
            acc[r] = 0.0
        if len(dead) == 0 or dead[r] == 0:
            out_r[m], out_v[m] = r, v
            m += 1
    return out_r[:m], out_v[:m]


@njit(cache=True, error_model="numpy")
def _exact(r, term_pos, weights, blocks, norm, bufr, buft):
    """Row ``r``'s score exactly as the exhaustive scorer sums it (query-term order, float64, then
    float32), each term's block found by binary search on the blocks' last rows. Returns (score,
    corrupted block or -1)."""
    total = 0.0
    for i in range(len(term_pos)):
        t = term_pos[i]
        j0, j1 = np.int64(blocks[0][t]), np.int64(blocks[0][t + 1])
        j = j0 + np.searchsorted(blocks[1][j0:j1], r)
        if j == j1:
            continue
        if not _read_block(j, j == j0, blocks, bufr, buft):
            return np.float32(0), np.int64(j)
        for p in range(np.int64(blocks[3][j])):
            if bufr[p] == r:
                total += np.float64(_contrib(weights[i], buft[p], norm[r]))
                break
    return np.float32(total), np.int64(-1)


@njit(cache=True, error_model="numpy")
def _select(rows, vals, k, term_pos, weights, blocks, norm, bufr, buft):
    """The k best of the candidate ``rows``: those within 1e-5 of the k-th accumulator (more than a
    float32 step, so no row left out can tie) rescored exactly, sorted by score then row."""
    theta = _kth(vals, k)
    out_r, out_s, c = np.empty(len(rows), np.int64), np.empty(len(rows), np.float32), 0
    for x in range(len(rows)):
        if vals[x] >= theta * (1.0 - 1e-5):
            score, bad = _exact(rows[x], term_pos, weights, blocks, norm, bufr, buft)
            if bad >= 0:
                return out_r[:0], out_s[:0], bad
            out_r[c], out_s[c] = rows[x], score
            c += 1
    idx = np.argsort(out_r[:c], kind="mergesort")  # rows ascending, then scores descending (stable)
    idx = idx[np.argsort(-out_s[:c][idx], kind="mergesort")][:k]
    return out_r[:c][idx], out_s[:c][idx], np.int64(-1)


@njit(cache=True, error_model="numpy")
def _still_possible(acc, touched, n, dead, k, remaining):
    """At the switch to candidates only: the touched rows that the terms still to come could lift
    to the k-th best score (sorted), or an empty array while an untouched row could still enter
    the top k (the bounds of the terms to come reach it)."""
    rows, vals = _gather(acc, touched, n, dead, False)
    theta = _kth(vals, k)
    if not remaining * SLACK < theta:
        return np.empty(0, np.int64)
    keep = (vals + remaining) * SLACK >= theta
    return np.sort(rows[keep])


@njit(cache=True, error_model="numpy")
def topk_pruned(term_pos, weights, blocks, norm, dead, k, k1, omb, bavg, scale, acc, touched):
    """The k best rows of one shard for one question, equal to the exhaustive scorer's.

    Term at a time, heaviest bound first, into ``acc`` (float64 per row, all 0 on entry and on
    return; ``touched``: int64 scratch of the same length). Once the bounds of the terms still to
    come cannot lift an untouched row to the k-th accumulator, only the touched rows they could
    still lift there stay candidates, and the rest of the terms update those alone, decoding only
    the blocks that hold one (skipped by their last rows). The candidates near the k-th are
    rescored exactly (:func:`_select`). ``term_pos``: the question's terms' positions in the shard's
    term table in query-term order, ``weights`` their float32 weights; ``norm``: per row,
    :func:`norms`; ``dead``: uint8 per row (1 = tombstoned) or empty; ``k1``/``omb``/``bavg``:
    float32 k1, 1 - b and b / avgdl (for the bounds' fallback); ``scale``: see
    :func:`_block_bound`. Returns (scores, rows, corrupted block or -1)."""
    ms = term_bounds(term_pos, weights, blocks, np.float64(k1), np.float64(omb), np.float64(bavg), scale)
    order = np.argsort(-ms, kind="mergesort")
    bufr, buft = np.empty(BLOCK, np.int64), np.empty(BLOCK, np.int64)
    remaining, n, bad = ms.sum(), np.int64(0), np.int64(-1)
    cand = np.empty(0, np.int64)
    for s in range(len(order)):
        t, w = term_pos[order[s]], weights[order[s]]
        if not len(cand) and n >= k and blocks[0][t + 1] - blocks[0][t] > 8:
            cand = _still_possible(acc, touched, n, dead, k, remaining)
        if len(cand):
            bad = _and_term(t, w, blocks, norm, acc, cand, bufr, buft)
        else:
            n, bad = _or_term(t, w, blocks, norm, acc, touched, n, bufr, buft)
        if bad >= 0:
            break
        remaining -= ms[order[s]]
    if len(cand):
        rows, vals = _gather(acc, cand, len(cand), dead, False)
        for x in range(n):
            acc[touched[x]] = 0.0
    else:
        rows, vals = _gather(acc, touched, n, dead, True)
    if bad >= 0:
        return np.empty(0, np.float32), np.empty(0, np.int64), bad
    rows, scores, bad = _select(rows, vals, k, term_pos, weights, blocks, norm, bufr, buft)
    return scores, rows, bad
