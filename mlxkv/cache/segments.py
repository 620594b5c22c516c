"""Attention over a cache held in segments, each scored straight from its storage.

A ``Segment`` is a run of cache slots in one codec's storage (sinks, ring, residual, a
chunk being prefilled). Keys are scored segment by segment (no dequantized copy of the
cache), one softmax runs over all segments, and the values are summed back the same way.
Which tokens a query may see comes from the segments themselves: their token positions
(causality, and a positional eviction's rule for chunked prefill) and, for slots shared by
all kv heads of a layer (AdaKV's pool), which head each slot belongs to.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import mlx.core as mx

from .codec import FLOAT


class Segment(NamedTuple):
    key_codec: object
    keys: tuple          # the key codec's storage of the segment's n slots
    value_codec: object
    values: tuple
    length: int          # slots
    positions: mx.array | None  # (length,) token positions; None: slots kept per head in
    #                             position order, all older than any query (scored rings)
    heads: mx.array | None = None  # (H, length) bool: the kv heads that see each slot
    #                                (a pool shared by a layer's heads), None: all


def visibility(segs: list[Segment], qpos: mx.array,
               rule: Callable[[mx.array, mx.array], mx.array] | None = None) -> mx.array:
    """(n_queries, T) bool: which held tokens the queries at positions ``qpos``
    (n_queries, 1) see: causal, and within ``rule(kpos, qpos)`` when one is given."""
    cols = []
    for s in segs:
        if s.positions is None:
            cols.append(mx.ones((qpos.shape[0], s.length), mx.bool_))
            continue
        kpos = s.positions[None, :]
        seen = kpos <= qpos
        cols.append(seen if rule is None else seen & rule(kpos, qpos))
    return cols[0] if len(cols) == 1 else mx.concatenate(cols, axis=1)


def attend_segments(q: mx.array, segs: list[Segment], visible: mx.array | None,
                    observe: Callable[[mx.array], None] | None = None) -> mx.array:
    """Attention of pre-scaled queries ``q`` (B, H, M, D), M = rep * n rows (n queries,
    rep query heads per kv head) over ``segs`` -> (B, H, M, Dv). ``visible``: (n, T) or
    None (every token). ``observe`` gets the probabilities (B, H, M, T) in float32."""
    parts = [s.key_codec.scores(q, s.keys) for s in segs]
    scores = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    if any(s.heads is not None for s in segs):
        H = scores.shape[1]
        mask = mx.concatenate([s.heads if s.heads is not None else mx.ones((H, s.length), mx.bool_)
                               for s in segs], axis=1)
        scores = mx.where(mask[None, :, None, :], scores, mx.finfo(scores.dtype).min)
    if visible is not None:
        B, H, M, T = scores.shape
        n = visible.shape[0]
        scores = mx.where(visible, scores.reshape(B, H, M // n, n, T),
                          mx.finfo(scores.dtype).min).reshape(B, H, M, T)
    probs = mx.softmax(scores.astype(mx.float32), axis=-1, precise=True)
    if observe is not None:
        observe(probs)
    probs = probs.astype(q.dtype)
    out, at = None, 0
    for s in segs:
        n = s.length
        part = s.value_codec.weighted(probs[..., at : at + n] if len(segs) > 1 else probs, s.values)
        out = part if out is None else out + part
        at += n
    return out


def dense(segs: list[Segment]) -> tuple[mx.array, mx.array]:
    """(keys, values) of every slot at full precision, in position order (for tests and
    references; attention never builds this)."""
    ks = [s.key_codec.decode(s.keys) for s in segs]
    vs = [s.value_codec.decode(s.values) for s in segs]
    k, v = mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)
    if all(s.positions is not None for s in segs):
        order = mx.argsort(mx.concatenate([s.positions for s in segs]))
        k, v = mx.take(k, order, axis=2), mx.take(v, order, axis=2)
    return k, v


def _decoded(seg: Segment, after: mx.array) -> Segment:
    """``seg`` with its storage decoded to full precision, once ``after`` is computed
    (keys stay coded when their scores are more than their decode's, e.g. a sketch)."""
    ks = tuple(mx.depends(list(seg.keys), [after]))
    vs = tuple(mx.depends(list(seg.values), [after]))
    seg = seg._replace(value_codec=FLOAT, values=(seg.value_codec.decode(vs),))
    if seg.key_codec.decodes_exactly:
        seg = seg._replace(key_codec=FLOAT, keys=(seg.key_codec.decode(ks),))
    return seg


def held(lay, eviction, pending, dense_after: mx.array | None = None) -> list[Segment]:
    """A cache's held tokens as segments: sinks, ring, middle, residual, and a pending chunk.

    With ``dense_after`` the ring and middle come dequantized (for a chunk of queries),
    computed only once that array is: so each layer's transient copy exists while that
    layer runs, not all layers' copies at once when a whole forward pass is evaluated.
    ``lay``: the cache's ``Layout``; ``pending``: a chunk awaiting attention, (keys,
    values, first position), or None."""
    segs = []
    if lay.n_sinks:
        n = lay.n_sinks
        segs.append(Segment(FLOAT, (lay.sink_keys[..., :n, :],), FLOAT,
                            (lay.sink_values[..., :n, :],), n, mx.arange(n)))
    ring = eviction.ring_segment(lay)
    if lay.mid_len:
        mk, mv = lay.middle_slots()
        middle = Segment(lay.mkc, mk, lay.mvc, mv, lay.mid_len,
                         lay.sinks + lay.flushed + mx.arange(lay.mid_len))
    else:
        middle = None
    for seg in (ring, middle):
        if seg is not None:
            segs.append(seg if dense_after is None else _decoded(seg, dense_after))
    if lay.res_len:
        rk, rv = lay.held_residual()
        first = lay.sinks + lay.flushed + lay.mid_len
        segs.append(Segment(FLOAT, (rk,), FLOAT, (rv,), lay.res_len,
                            first + mx.arange(lay.res_len)))
    if pending is not None:
        k, v, p0 = pending
        segs.append(Segment(FLOAT, (k,), FLOAT, (v,), k.shape[2], p0 + mx.arange(k.shape[2])))
    return segs
