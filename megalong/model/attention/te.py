"""Transformer Engine's fused attention on packed (THD) documents. GPU only, imported lazily.

The input arrives in Megatron's [s, b, h, d] layout with RoPE already applied at global
positions. Two kernels, chosen by ``core.DocumentAttention``:

* CP = 1 (``TEDocumentKernel``): q/k/v are flattened sample-major into THD ("total
  tokens, heads, dim") and the documents of all samples become TE's variable-length
  sequences (``cu_seqlens``); no padding is needed.
* CP > 1 (``TEContextParallelKernel``): TE's own context parallelism, its ring ("p2p")
  or all-to-all, on TE's per-document THD layout (every document padded to a multiple of
  2 x CP, tokens exchanged into that layout by ``thd_relayout``). megalong's own ring and
  all-to-all are not used with this backend.

Not run on a GPU in this repository's CI: ``tools/gpu_check.py`` checks it against the
PyTorch backend on a GPU machine.
"""

from __future__ import annotations

import torch

from megalong.model.attention.layout import DocumentLayout


def _te_document_attention(query_heads: int, kv_heads: int, head_dim: int, layer_number: int,
                           softmax_scale: float, **context_parallel):
    """TE's DotProductAttention on THD input with per-document causal masks."""
    from transformer_engine.pytorch import DotProductAttention

    return DotProductAttention(
        num_attention_heads=query_heads, kv_channels=head_dim, num_gqa_groups=kv_heads,
        attention_dropout=0.0, qkv_format="thd", attn_mask_type="padding_causal", attention_type="self",
        layer_number=layer_number, softmax_scale=softmax_scale, **context_parallel,
    )


class TEDocumentKernel(torch.nn.Module):
    """Wraps ``transformer_engine.pytorch.DotProductAttention`` in THD / padding_causal mode
    over whole sequences (CP = 1).

    TE modules are built for a fixed number of heads, and only when a forward pass reaches
    them (TE is imported lazily): one per (query heads, KV heads) seen.
    """

    def __init__(self, head_dim: int, softmax_scale: float, layer_number: int):
        super().__init__()
        self.head_dim = head_dim
        self.softmax_scale = softmax_scale
        self.layer_number = layer_number
        # A plain dict, not a ModuleDict: TE's modules carry no weights, and keeping them out
        # of the state dict keeps checkpoints identical across attention backends.
        self.kernels = {}

    def _kernel(self, query_heads: int, kv_heads: int):
        name = f"q{query_heads}_kv{kv_heads}"
        if name not in self.kernels:
            self.kernels[name] = _te_document_attention(
                query_heads, kv_heads, self.head_dim, self.layer_number, self.softmax_scale)
        return self.kernels[name]

    def forward(self, query, key, value, layout: DocumentLayout) -> torch.Tensor:
        s, b, hq, d = query.shape
        cu = layout.flat_cu_seqlens(query.device)  # moved once per micro-batch (cached)
        max_len = layout.max_document_length()

        def flat(x):
            return x.transpose(0, 1).reshape(b * s, x.shape[2], d).contiguous()

        out = self._kernel(hq, key.shape[2])(
            flat(query), flat(key), flat(value),
            attn_mask_type="padding_causal",
            cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len,
        )
        return out.reshape(b, s, hq * d).transpose(0, 1)


class TEContextParallelKernel(torch.nn.Module):
    """Transformer Engine's own context parallelism on packed documents (THD).

    q/k/v are moved from Megatron's load-balanced layout into TE's per-document THD layout
    (``thd_relayout``), TE runs its ring (``cp_comm_type="p2p"``) or all-to-all
    (``"a2a"``) attention over the CP group with padded and real boundaries, and the output
    is moved back. GPU and NCCL only; not run on a GPU in this repository's CI.
    """

    def __init__(self, head_dim: int, softmax_scale: float, layer_number: int, cp_group, cp_comm: str):
        super().__init__()
        import torch.distributed as dist

        self.head_dim = head_dim
        self.softmax_scale = softmax_scale
        self.layer_number = layer_number
        self.cp_group = cp_group
        self.cp_size = dist.get_world_size(cp_group)
        self.cp_rank = dist.get_rank(cp_group)
        self.cp_global_ranks = dist.get_process_group_ranks(cp_group)
        self.cp_comm_type = {"ring": "p2p", "a2a": "a2a"}[cp_comm]
        self.cp_stream = None
        # A plain dict, not a ModuleDict: TE's modules carry no weights, and keeping them out
        # of the state dict keeps checkpoints identical across attention backends.
        self.kernels = {}

    def _kernel(self, query_heads: int, kv_heads: int):
        name = f"q{query_heads}_kv{kv_heads}"
        if name not in self.kernels:
            if self.cp_stream is None:
                self.cp_stream = torch.cuda.Stream()
            self.kernels[name] = _te_document_attention(
                query_heads, kv_heads, self.head_dim, self.layer_number, self.softmax_scale,
                cp_group=self.cp_group, cp_global_ranks=self.cp_global_ranks, cp_stream=self.cp_stream,
                cp_comm_type=self.cp_comm_type,
            )
        return self.kernels[name]

    def forward(self, query, key, value, layout: DocumentLayout) -> torch.Tensor:
        from megalong.model.attention.thd_relayout import from_thd, thd_plan, to_thd

        s_local, b, hq, d = query.shape
        # Made and moved to the device once per micro-batch; every layer uses it as it is.
        plan = thd_plan(layout, self.cp_size, self.cp_rank, query.device)
        out = self._kernel(hq, key.shape[2])(
            to_thd(query, plan, self.cp_group), to_thd(key, plan, self.cp_group),
            to_thd(value, plan, self.cp_group),
            attn_mask_type="padding_causal",
            cu_seqlens_q=plan.cu_seqlens, cu_seqlens_kv=plan.cu_seqlens,
            cu_seqlens_q_padded=plan.cu_seqlens_padded, cu_seqlens_kv_padded=plan.cu_seqlens_padded,
            max_seqlen_q=plan.max_padded_length, max_seqlen_kv=plan.max_padded_length,
            pad_between_seqs=plan.pad_between_seqs,
        )
        return from_thd(out.reshape(-1, hq * d), plan, s_local, b, self.cp_group).reshape(s_local, b, hq * d)
