"""The tools beside the conformance harness: the parallel-strategy planner (`tools.plan`), the attention bench
(`tools.bench`), the prepared one-GPU run (`tools.gpu`) and the ahead-of-time Triton build (`tools.triton_build`).

They are not conformance: none holds an optimized technique to its spec. Each is a verb of the one CLI,
`python -m conformance plan | bench | gpu`, which imports it only when asked. A tool may use the harness's helpers
(flags, measure, result); the harness imports a tool only where a check judges it (checks/plan.py the planner,
checks/attention.py the build's row)."""
