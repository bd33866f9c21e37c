"""Each parallel technique once more, for a reader: one process, simulated ranks.

A rank's data is an entry of a Python list (`shards[r]` is what rank r holds) and a collective is the plain sum or
concatenation it computes (`ranks.py`), so the whole algorithm runs, autograd included, in one process on a laptop
and every intermediate can be printed. Each file states the math, the shapes and the paper, and is held equal to the
unsharded model (reference/model.py, reference/training.py) and to the optimized multi-process module by the
conformance suite, so the spec cannot drift from either.

    data_parallel.py      every rank a replica, gradients averaged (all-reduce)
    zero.py               ZeRO-1/2/3: optimizer state, gradients, parameters partitioned
    tensor_parallel.py    Megatron column/row splits, with sequence parallelism
    pipeline.py           layers split into stages, the 1F1B schedule
    context_parallel.py   the sequence split, ring attention with the log-sum-exp merge
    expert_parallel.py    a top-k mixture of experts, tokens sent to their expert's rank (all-to-all)
"""
