"""The cells of `python -m conformance matrix`: the machine settings it varies, which values this machine offers,
and a covering set of cells (conformance/matrix.py runs them).

Dimensions (what a cell sets, and why it moves the last bits):
  isa           the CPU instruction set the kernels may use. `native` sets nothing: ATen's widest vector kernels and
                whatever oneDNN and MKL pick for this CPU (AMX tiles and AVX-512 BF16 on a Sapphire Rapids). A forced
                level sets three variables together, each library's ceiling: ATEN_CPU_CAPABILITY (ATen's own kernels:
                reductions, softmax, elementwise), ONEDNN_MAX_CPU_ISA (oneDNN: linear, matmul, conv on the mkldnn
                path) and MKL_ENABLE_INSTRUCTIONS (MKL's sgemm/dgemm, torch's default CPU BLAS):
                  avx512   avx512 / AVX512_CORE / AVX512     (no AMX, no BF16 dot products)
                  avx2     avx2 / AVX2 / AVX2
                  default  default / SSE41 / SSE4_2         (ATen's unvectorized "DEFAULT" kernels)
                A wider vector holds more partial sums, so a reduction adds its terms in another order, and FMA
                contraction differs between kernels: the last bits differ per level. Only the levels this CPU has
                are offered (a forced level above the hardware would silently run a lower one); off x86 only
                `native` and `default` (ATen's variable alone).
  threads       intra-op threads of the suite's own process: 1, 2, 4, set by the suite's --threads
                (torch.set_num_threads) and OMP_NUM_THREADS (for OpenMP and MKL). OMP_NUM_THREADS alone is not
                enough: torch caps the count it derives from it at the cores (4 gave 2 on a 2-core machine); the
                report's environment shows the count that took effect. A parallel reduction splits its terms into
                one chunk per thread and adds the partial sums at the end: another order per count. The ranks of a
                multi-rank check set one thread each (conformance.launch: N ranks share the cores), so the thread
                count reaches the single-process checks and the caller's side only.
  world_size    ranks of the multi-rank checks, 1 to 4 (--world-size): how a batch, a layer or an optimizer state is
                split, and the order in which the all-reduce adds the ranks' parts; 3 finds padding bugs (sizes that
                do not divide).
  precision     torch.set_float32_matmul_precision (--matmul-precision of the suite). On CPU "high" asks oneDNN for
                TF32, which no CPU has: the same bits as "highest". "medium" lets oneDNN form float32 matmuls from
                bfloat16 products where the CPU has them fast (AMX): max error of a 256x512 @ 512x256 product against
                float64 5.2e-5 at "highest", 0.26 at "medium" on a Sapphire Rapids; with ONEDNN_MAX_CPU_ISA below
                AVX512_CORE_AMX "medium" stays float32 but goes through oneDNN instead of MKL (8.9e-5: another
                kernel). The flag sets the suite's own process, and conformance.launch hands it to every rank it
                spawns (a fresh interpreter would start at "highest"); the float32 bounds follow it
                (conformance.tolerance.working_eps: TF32's epsilon under "high", bf16's under "medium").
  tf32          CUDA only, in place of `precision` (on CUDA set_float32_matmul_precision is the TF32 switch of
                matmuls): on / off sets torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                (--tf32 of the suite). TF32 keeps 10 of float32's 23 mantissa bits in the products. "on" also sets
                TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which torch reads at start in every process, so the spawned ranks
                multiply in TF32 too; with "off" they keep torch's defaults (cuBLAS TF32 off, cuDNN TF32 on, and no
                workload here runs a convolution).

The cells: every value of every dimension appears in at least one cell (4 cells on a CPU with AVX-512: the longest
dimension), chosen greedily so that each cell adds as many values not yet covered as it can. --pairwise also covers
every combination of the pairs that interact (IMPORTANT_PAIRS: the ISA ceiling decides which kernel "medium"
picks; TF32 in the ranks meets the all-reduce), at the price of more cells (12 on such a CPU). Each cell is a whole
suite run, so the product of all dimensions (144 cells) is not on offer. A cell is named `isa-tTHREADS-wRANKS-
precision` (on CUDA `...-tf32on` / `-tf32off`); --cells runs named cells.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

ISA_LEVELS: dict[str, dict[str, str]] = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
"""Each ISA level's environment: the ceiling of ATen's kernels, of oneDNN and of MKL, set together."""
THREADS = (1, 2, 4)
WORLD_SIZES = (1, 2, 3, 4)
PRECISIONS = ("highest", "high", "medium")
TF32 = ("on", "off")
IMPORTANT_PAIRS = (("isa", "precision"), ("tf32", "world_size"))
"""Pairs of dimensions that interact (the module docstring says how); --pairwise covers each of their combinations.
A pair whose dimensions this machine does not have is left out."""


@dataclass(frozen=True)
class Machine:
    """What the cells may ask of this machine."""

    isa_levels: tuple[str, ...]
    """The ISA levels this CPU runs (see ISA_LEVELS), widest first."""
    cuda_devices: int
    """Visible CUDA devices; 0 runs the CPU suite."""


@dataclass(frozen=True)
class Cell:
    """One machine setting: a run of the suite."""

    isa: str
    threads: int
    world_size: int
    precision: str | None = None
    """CPU: torch.set_float32_matmul_precision; None on CUDA (tf32 takes its place)."""
    tf32: str | None = None
    """CUDA: "on" / "off"; None on CPU."""

    @property
    def name(self) -> str:
        last = self.precision if self.tf32 is None else f"tf32{self.tf32}"
        return f"{self.isa}-t{self.threads}-w{self.world_size}-{last}"

    def env(self) -> dict[str, str]:
        """The variables this cell adds to (or overrides in) the inherited environment."""
        env = dict(ISA_LEVELS[self.isa])
        env["OMP_NUM_THREADS"] = str(self.threads)
        if self.tf32 == "on" or self.precision == "high":  # every process, spawned ranks included, starts at "high"
            env["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "1"
        return env

    def args(self) -> list[str]:
        """The suite's flags for this cell."""
        args = ["--world-size", str(self.world_size), "--threads", str(self.threads)]
        if self.precision is not None:
            args += ["--matmul-precision", self.precision]
        if self.tf32 is not None:
            args += ["--device", "cuda", "--tf32", self.tf32]
        return args


def machine() -> Machine:
    """This machine: the ISA levels its CPU has (from the CPU's feature flags, not from a forced
    ATEN_CPU_CAPABILITY) and its CUDA devices."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        levels = ("native", "default")
    else:
        has_avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
        has_avx2 = getattr(torch.cpu, "_is_avx2_supported", None)
        if has_avx512 is None or has_avx2 is None:  # an older torch: its running capability (unforced here)
            capability = torch.backends.cpu.get_cpu_capability().lower()
            avx512, avx2 = capability.startswith("avx512"), capability.startswith("avx")
        else:
            avx512, avx2 = has_avx512(), has_avx2()
        levels = tuple(n for n, ok in (("native", True), ("avx512", avx512), ("avx2", avx2), ("default", True)) if ok)
    return Machine(isa_levels=levels, cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0)


def dimensions(m: Machine) -> dict[str, tuple]:
    """Each dimension's values on machine `m`, in the order the cells take them."""
    dims: dict[str, tuple] = {"isa": m.isa_levels, "threads": THREADS}
    if m.cuda_devices:
        dims["world_size"] = tuple(w for w in WORLD_SIZES if w <= m.cuda_devices)
        dims["tf32"] = TF32
    else:
        dims["world_size"] = WORLD_SIZES
        # "medium" first: the first cell takes the widest ISA level, where "medium" can mean bfloat16 products.
        dims["precision"] = ("medium", "highest", "high")
    return dims


def covering(dims: dict[str, tuple], pairs: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """Cells (dimension -> value) in which every value of every dimension appears, and every combination of the
    values of each pair in `pairs` (pairs naming a dimension not in `dims` are left out).

    Greedy (AETG's idea): a cell starts from the first requirement not yet covered, then each other dimension takes
    the value that covers the most requirements still open, ties going to the value used least so far, then to the
    earlier one. Deterministic."""
    pairs = tuple((a, b) for a, b in pairs if a in dims and b in dims)
    open_: list[frozenset] = [frozenset({(a, va), (b, vb)}) for a, b in pairs for va in dims[a] for vb in dims[b]]
    open_ += [frozenset({(d, v)}) for d in dims for v in dims[d]]
    used: dict[tuple, int] = {(d, v): 0 for d in dims for v in dims[d]}
    cells = []
    while open_:
        cell = dict(open_[0])
        for d in dims:
            if d not in cell:
                gains = {v: sum(1 for r in open_ if r <= set(cell.items()) | {(d, v)}) for v in dims[d]}
                cell[d] = min(dims[d], key=lambda v, d=d, gains=gains: (-gains[v], used[(d, v)], dims[d].index(v)))
        items = set(cell.items())
        open_ = [r for r in open_ if not r <= items]
        for item in items:
            used[item] += 1
        cells.append({d: cell[d] for d in dims})
    return cells


def cells_for(m: Machine, *, pairwise: bool) -> list[Cell]:
    """The default cells on machine `m`: every value of every dimension, and with `pairwise` the IMPORTANT_PAIRS."""
    return [Cell(**c) for c in covering(dimensions(m), IMPORTANT_PAIRS if pairwise else ())]


def parse_cell(text: str, m: Machine) -> Cell:
    """`isa-tTHREADS-wRANKS-precision` (CPU) or `isa-tTHREADS-wRANKS-tf32on|tf32off` (CUDA), each value one this
    machine offers; ValueError naming the part that is wrong and what is allowed."""
    form = "ISA-tTHREADS-wRANKS-" + ("tf32on|tf32off" if m.cuda_devices else "PRECISION")
    parts = text.split("-")
    if len(parts) != 4:
        raise ValueError(f"cell {text!r} is not {form} (e.g. {cells_for(m, pairwise=False)[0].name})")
    isa, threads, world, last = parts
    if isa not in m.isa_levels:
        why = "not offered on this CPU; " if isa in ISA_LEVELS else ""
        raise ValueError(f"cell {text!r}: ISA level {isa!r} is {why or 'unknown; '}allowed: {', '.join(m.isa_levels)}")
    dims = dimensions(m)
    numbers = {}
    for key, part, prefix in (("threads", threads, "t"), ("world_size", world, "w")):
        value = int(part[1:]) if part[:1] == prefix and part[1:].isdigit() else None
        if value is None or value < 1:
            raise ValueError(f"cell {text!r}: {part!r} is not {prefix}N (N >= 1, e.g. {prefix}{dims[key][-1]})")
        numbers[key] = value
    if m.cuda_devices and numbers["world_size"] > m.cuda_devices:
        raise ValueError(f"cell {text!r}: {numbers['world_size']} ranks exceed the {m.cuda_devices} visible GPUs")
    if m.cuda_devices:
        if last not in ("tf32on", "tf32off"):
            raise ValueError(f"cell {text!r}: {last!r} on CUDA must be tf32on or tf32off")
        return Cell(isa, numbers["threads"], numbers["world_size"], tf32=last[4:])
    if last not in PRECISIONS:
        raise ValueError(f"cell {text!r}: matmul precision {last!r} is not one of {', '.join(PRECISIONS)}"
                         + (" (tf32on/tf32off are for CUDA; no GPU is visible)" if last.startswith("tf32") else ""))
    return Cell(isa, numbers["threads"], numbers["world_size"], precision=last)
