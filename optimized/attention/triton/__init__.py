"""FlashAttention-2 as Triton kernels: forward, and a deterministic backward (no atomics).

The algorithm of optimized/attention/blocked.py (FA2, Dao 2023, arXiv 2307.08691, Algorithms 1 and 2), one program
per tile, written after the Triton fused-attention tutorial and the FA2 paper. One job per file:

    common.py     the @triton.jit pieces both passes share: which rows a program's sequence spans, the softcap.
    forward.py    _fwd_kernel: one program per (query tile, batch x query head), online softmax over the key
                  tiles, writes O and LSE (FA2 Alg. 1).
    backward.py   _bwd_preprocess (D = rowsum(dO ∘ O), Alg. 2 line 3), _bwd_dkdv_kernel (one program per key tile
                  and key/value head, looping over its GQA group's query heads and the query tiles; lines 4-17) and
                  _bwd_dq_kernel (one program per query tile and query head, looping over the key tiles).
    tuning.py     the tiles, warps and pipeline stages per architecture, dtype and head dim (no Triton needed).
    launch.py     the launches as data (grids, arguments, constexprs), the autograd function, the entry points
                  `triton_attention` / `triton_attention_varlen`, and `unsupported`: what the kernels cannot serve.

FA2 accumulates dQ with atomic adds from the dK/dV pass; here dQ has its own pass instead, so each gradient element
is summed by one program in a fixed order and the backward is bitwise reproducible, at the cost of computing
S = Q Kᵀ and dP = dO Vᵀ twice.

Supported: causal masks in both alignments (query i sees keys j <= i + offset, offset 0 for top-left and M - N for
bottom-right), sliding windows (the right edge moves that offset; the left edge, keys j >= i + window_offset, is a
second diagonal: key tiles left of it are skipped like those right of the causal one; Beltagy et al. 2020), softcap
(S -> c·tanh(S / c), Gemma 2; the backward multiplies dS by 1 - tanh²), GQA/MQA, N != M and any length (tails
masked), head dims 1..256 (padded to a power of two >= 16), float16 / bfloat16 / float32 inputs (float32 dot
products in IEEE precision, not TF32), a (B, M) key padding mask, and packed documents (varlen, flash-attn's
cu_seqlens layout): there the grid's second axis is documents x heads, each program reads its document's first row
and length from cu_seqlens (`common.sequence`), its tiles start at that row, programs past a shorter document's end
return at once, and the masks are bottom-right aligned per document, so no program reads another document's rows and
the cost is the sum of the documents' squares. Scores are handled in base 2 (exp2 of S·scale·log2 e), LSE is stored
in natural log; softcap in base 2 is C·tanh(s / C) with C = c·log2 e.

The kernels need CUDA tensors, unless Triton's interpreter is active (TRITON_INTERPRET=1 set before the kernel
modules are first imported: `triton.jit` reads it when it decorates a kernel), in which case they run on CPU tensors;
`launch.interpreted()` says which. The interpreter has no bfloat16.

This package's __init__ imports nothing, so `optimized.attention` and `tuning` import without Triton; the kernel
modules and `launch` need it.
"""
