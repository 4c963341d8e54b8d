"""Block-sparse document-masked attention in plain PyTorch, with its log-sum-exp.

The ring (``ring.py``) needs, for one block of queries against one block of keys, the
partial output *and* the log-sum-exp of each query row, so that partial results from
different key blocks can be merged exactly; and a backward that recomputes the
probabilities from the *final* log-sum-exp (as FlashAttention does). PyTorch's SDPA
returns neither, so this is written out here.

On CPU each tile runs PyTorch's fused flash-attention op, which returns the log-sum-exp
and has a backward taking it; elsewhere (GPU) the scores of a tile are written out.

Work is skipped at tile granularity: queries and keys are cut into tiles of contiguous
positions, and a key tile is only touched by a query tile when causality and the
document boundaries leave some pair visible. With many short documents most tiles are
skipped and the cost approaches sum(len^2) instead of S^2.

Shapes: q [b, hkv, g, sq, d] (g query heads share each KV head: GQA without copying
K/V), k and v [b, hkv, sk, d]; positions ``*_pos`` int64 [s]; document ids ``*_doc``
int64 [b, s]. Log-sum-exp and the softmax run in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megalong.model.attention.reference import document_causal_mask

DEFAULT_TILE = 256


@dataclass(frozen=True)
class Tiles:
    """Tiles of contiguous positions: local index ranges plus their position/document spans."""

    starts: list
    ends: list
    pos_lo: torch.Tensor  # [n]
    pos_hi: torch.Tensor  # [n]
    doc_lo: torch.Tensor  # [b, n]
    doc_hi: torch.Tensor  # [b, n]


def cut_tiles(pos: torch.Tensor, doc: torch.Tensor, tile: int) -> Tiles:
    pos_cpu = pos.cpu()
    breaks = (torch.nonzero(pos_cpu[1:] != pos_cpu[:-1] + 1).flatten() + 1).tolist()
    starts, ends = [], []
    run_start = 0
    for run_end in breaks + [pos_cpu.numel()]:
        for s in range(run_start, run_end, tile):
            starts.append(s)
            ends.append(min(s + tile, run_end))
        run_start = run_end
    first = torch.tensor(starts)
    last = torch.tensor(ends) - 1
    doc_cpu = doc.cpu()
    return Tiles(starts, ends, pos_cpu[first], pos_cpu[last], doc_cpu[:, first], doc_cpu[:, last])


def visible_tiles(q_tiles: Tiles, k_tiles: Tiles) -> torch.Tensor:
    """Bool [nq, nk]: False only where every query/key pair of the two tiles is masked.

    Positions rise inside a tile and document ids never fall with position, so a key tile
    can only be seen if it starts no later than the query tile ends and, in some sample,
    their document-id ranges overlap. The test errs on the side of visible; the exact
    mask is applied inside the tile.
    """
    causal = k_tiles.pos_lo[None, :] <= q_tiles.pos_hi[:, None]
    overlap = (k_tiles.doc_lo[:, None, :] <= q_tiles.doc_hi[:, :, None]) & (
        k_tiles.doc_hi[:, None, :] >= q_tiles.doc_lo[:, :, None]
    )
    return causal & overlap.any(dim=0)


@dataclass(frozen=True)
class BlockPlan:
    """For every query tile, the key index ranges it must look at."""

    rows: list  # [(q_start, q_end, [(k_start, k_end), ...]), ...]
    visible_pairs: int
    total_pairs: int

    @property
    def empty(self) -> bool:
        return self.visible_pairs == 0

    def visible_fraction(self) -> float:
        return self.visible_pairs / max(1, self.total_pairs)


def plan_blocks(q_pos, q_doc, k_pos, k_doc, tile: int = DEFAULT_TILE) -> BlockPlan:
    q_tiles, k_tiles = cut_tiles(q_pos, q_doc, tile), cut_tiles(k_pos, k_doc, tile)
    visible = visible_tiles(q_tiles, k_tiles)
    rows = []
    for i in range(len(q_tiles.starts)):
        ranges = []
        for j in torch.nonzero(visible[i]).flatten().tolist():
            ks, ke = k_tiles.starts[j], k_tiles.ends[j]
            if ranges and ranges[-1][1] == ks:
                ranges[-1] = (ranges[-1][0], ke)
            else:
                ranges.append((ks, ke))
        if ranges:
            rows.append((q_tiles.starts[i], q_tiles.ends[i], ranges))
    return BlockPlan(rows, int(visible.sum()), int(visible.numel()))


def _select(x: torch.Tensor, ranges, dim: int) -> torch.Tensor:
    if len(ranges) == 1:
        return x.narrow(dim, ranges[0][0], ranges[0][1] - ranges[0][0])
    return torch.cat([x.narrow(dim, s, e - s) for s, e in ranges], dim=dim)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input's own dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def _masked_scores(q_t, k_sel, mask, scale):
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q_t, k_sel).to(accumulation_dtype(q_t.dtype))
    return scores.mul_(scale).masked_fill_(~mask[:, None, None], float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """Rows that see no key have lse = -inf; use 0 there so exp(scores - lse) stays 0, not NaN."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _fused_available(x: torch.Tensor) -> bool:
    """PyTorch's fused CPU flash-attention op returns the log-sum-exp and takes one back."""
    return x.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _stacked(x: torch.Tensor) -> torch.Tensor:
    """[b, hkv, g, t, d] -> [b, hkv, g * t, d]: the g query heads of a KV head as one longer query block."""
    b, hkv, g, t, d = x.shape
    return x.reshape(b, hkv, g * t, d)


def _additive_mask(mask: torch.Tensor, groups: int, dtype) -> torch.Tensor:
    """Boolean [b, t, k] -> additive [b, 1, g * t, k] (0 where visible, -inf where masked)."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, None].repeat(1, 1, groups, 1)


def block_forward(q, k, v, q_pos, q_doc, k_pos, k_doc, scale: float, plan: BlockPlan, fused=None):
    """Partial attention of queries q over keys k: returns (out like q, lse [b, hkv, g, sq]).

    Rows that see no key get out = 0 and lse = -inf (they merge as "nothing seen").
    ``fused`` (default: on CPU) uses PyTorch's fused CPU flash-attention op per tile;
    otherwise the scores are written out.
    """
    if fused is None:
        fused = _fused_available(q)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    for qs, qe, ranges in plan.rows:
        q_t = q[..., qs:qe, :]
        k_sel, v_sel = _select(k, ranges, 2), _select(v, ranges, 2)
        mask = document_causal_mask(q_pos[qs:qe], q_doc[:, qs:qe], _select(k_pos, ranges, 0), _select(k_doc, ranges, 1))
        if fused:
            b, hkv, g, t, d = q_t.shape
            tile_out, tile_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _stacked(q_t), k_sel, v_sel, 0.0, False, attn_mask=_additive_mask(mask, g, q.dtype), scale=scale,
            )
            tile_lse = tile_lse.reshape(b, hkv, g, t).to(lse.dtype)
            # The fused op reports lse = 0 for rows that see nothing; the merge needs -inf.
            seen = mask.any(dim=-1)[:, None, None, :]
            out[..., qs:qe, :] = tile_out.reshape(b, hkv, g, t, d)
            lse[..., qs:qe] = torch.where(seen, tile_lse, torch.full_like(tile_lse, float("-inf")))
            continue
        scores = _masked_scores(q_t, k_sel, mask, scale)
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = scores.sub_(_finite(row_lse)[..., None]).exp_()
        out[..., qs:qe, :] = torch.einsum("bhgqk,bhkd->bhgqd", probs.to(v.dtype), v_sel)
        lse[..., qs:qe] = row_lse
    return out, lse


def block_backward(dout, q, k, v, out, lse, delta, q_pos, q_doc, k_pos, k_doc, scale: float, plan: BlockPlan,
                   fused=None):
    """Gradients of one query block against one key block, given the FINAL row out and lse.

    ``delta`` = rowsum(dout * out_final) ([b, hkv, g, sq]). Returns (dq, dk, dv) in the
    accumulation dtype; dk/dv are this block's contribution to those keys' gradients.
    """
    if fused is None:
        fused = _fused_available(q)
    acc = accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for qs, qe, ranges in plan.rows:
        mask = document_causal_mask(q_pos[qs:qe], q_doc[:, qs:qe], _select(k_pos, ranges, 0), _select(k_doc, ranges, 1))
        k_sel, v_sel = _select(k, ranges, 2), _select(v, ranges, 2)
        if fused:
            b, hkv, g, t, d = q[..., qs:qe, :].shape
            dq_t, dk_sel, dv_sel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _stacked(dout[..., qs:qe, :]), _stacked(q[..., qs:qe, :]), k_sel, v_sel,
                _stacked(out[..., qs:qe, :]), lse[..., qs:qe].reshape(b, hkv, g * t).to(acc), 0.0, False,
                attn_mask=_additive_mask(mask, g, q.dtype), scale=scale,
            )
            dq[..., qs:qe, :] = dq_t.reshape(b, hkv, g, t, d)
        else:
            dq_t, dk_sel, dv_sel = _math_tile_backward(
                dout[..., qs:qe, :].to(acc), q[..., qs:qe, :].to(acc), k_sel.to(acc), v_sel.to(acc),
                mask, lse[..., qs:qe], delta[..., qs:qe], scale,
            )
            dq[..., qs:qe, :] = dq_t
        offset = 0
        for ks, ke in ranges:
            n = ke - ks
            dk[:, :, ks:ke] += dk_sel[:, :, offset:offset + n]
            dv[:, :, ks:ke] += dv_sel[:, :, offset:offset + n]
            offset += n
    return dq, dk, dv


def _math_tile_backward(do_t, q_t, k_sel, v_sel, mask, lse, delta, scale):
    """One query tile's gradients with the scores written out (probabilities from the final lse)."""
    scores = _masked_scores(q_t, k_sel, mask, scale)
    probs = scores.sub_(_finite(lse)[..., None]).exp_()
    dv_sel = torch.einsum("bhgqk,bhgqd->bhkd", probs, do_t)
    dprobs = torch.einsum("bhgqd,bhkd->bhgqk", do_t, v_sel)
    dscores = dprobs.sub_(delta[..., None]).mul_(probs)
    dq_t = torch.einsum("bhgqk,bhkd->bhgqd", dscores, k_sel) * scale
    dk_sel = torch.einsum("bhgqk,bhgqd->bhkd", dscores, q_t) * scale
    return dq_t, dk_sel, dv_sel


def merge_partial(out, lse, block_out, block_lse):
    """Fold one block's partial result into the running (out, lse), exactly, in place-free form."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = _finite(new_lse)
    old_weight = torch.exp(lse - safe)[..., None]
    new_weight = torch.exp(block_lse - safe)[..., None]
    merged = out * old_weight + block_out.to(out.dtype) * new_weight
    return merged, new_lse
