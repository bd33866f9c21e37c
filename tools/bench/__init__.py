"""`python -m conformance bench attention`: attention TFLOP/s on one CUDA GPU, ours against SDPA and flash-attn.

    python -m conformance bench attention                       bf16/fp16, d = 64/128, N = 1K..16K, causal and not
    python -m conformance bench attention --quick               N = 1K, 4K, 8K, fewer repetitions
    python -m conformance bench attention --dtype bf16 --head-dim 128 --seqlen 8192 --causal yes --out bench

Implementations: our Triton kernels (optimized.attention.triton), torch SDPA forced onto each of its flash,
memory-efficient and cuDNN backends (torch.nn.attention.sdpa_kernel), and flash-attn's `flash_attn_func` where
installed. One that refuses a case is reported "n/a" with its reason, never a crash.

Shapes follow flash-attn's benchmarks/benchmark_flash_attention.py: B·N = 16K tokens and H = 2048 / d, so every
case does about the same work per token. FLOPs are counted as FA2 (Dao 2023, arXiv 2307.08691) and that script
count them: forward 4·B·H·N·M·d (half when causal), backward 2.5x the forward, forward + backward 3.5x. TFLOP/s
is that count over the median time of repeated calls after warm-up (CUDA events), and "% peak" its share of the
GPU's dense bf16/fp16 tensor-core peak (DENSE_PEAK_TFLOPS; omitted for a GPU not in the table).

Also measured: the peak memory of naive attention (reference.attention.attention) over a flash implementation's,
forward + backward at N = 4K (torch.cuda.max_memory_allocated, reset between): the FlashAttention paper's "20x at
4K" (arXiv 2205.14135, Fig. 3). Writes a table to stdout, bench.json (rewritten after every case, so a run cut
short keeps what it measured) and bench.png into --out.

One job per module: `cases` (the problems, their FLOP count, the implementations, the GPUs' peaks), `measure`
(timing a case, the memory ratio), `report` (the table, the headline ratios, the plot), `cli` (the run and its flags).
"""
