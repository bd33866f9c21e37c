"""Measuring the bench: each implementation's time and rate on a case, in each mode, and the peak memory of naive
attention against each flash implementation's. A refusal or a failure is a result with its reason, never a crash."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from conformance.measure import cuda_peak_bytes, peak_live_bytes, time_fn
from tools.bench.cases import DTYPES, IMPLEMENTATIONS, MEMORY_N, MODES, Attention, Case, missing_package


@dataclass
class Timing:
    """One (case, implementation, mode): its time and rate, or why it has none."""

    ms: float | None = None
    tflops: float | None = None
    pct_peak: float | None = None
    na: str | None = None
    """Why there is no number: the implementation refused the case, or failed on it."""


@dataclass
class CaseResult:
    case: Case
    timings: dict[str, dict[str, Timing]] = field(default_factory=dict)
    """{implementation: {mode: Timing}}"""

    def to_dict(self) -> dict:
        return {**asdict(self.case), "label": self.case.label,
                "timings": {i: {m: asdict(t) for m, t in modes.items()} for i, modes in self.timings.items()}}


def _reason(error: BaseException, caught: list) -> str:
    """One line: what the implementation said (its warnings first: SDPA explains a refusal there), then the error."""
    lines = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    text = str(error).strip().splitlines()
    lines.append(f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": "))
    unique = list(dict.fromkeys(lines))
    return "; ".join(unique)[:300]


def _inputs(case: Case, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, d_out = (torch.randn(case.B, case.H, case.N, case.d, generator=gen, device=device,
                                  dtype=DTYPES[case.dtype]) for _ in range(4))  # (B, H, N, d) each
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), d_out


def _step(fn: Attention, mode: str, q: Tensor, k: Tensor, v: Tensor, d_out: Tensor, causal: bool) -> Callable:
    if mode == "fwd":
        return lambda: fn(q, k, v, causal)
    return lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), d_out)  # no .grad accumulation to time


def measure_case(case: Case, impls: tuple[str, ...], device: torch.device, *, modes: tuple[str, ...] = MODES,
                 warmup: int = 3, reps: int = 10, peak: float | None = None) -> CaseResult:
    """Time each implementation on `case` in each mode on `device` (CUDA events on CUDA, wall clock elsewhere)."""
    result = CaseResult(case)
    q, k, v, d_out = _inputs(case, device)
    for impl in impls:
        result.timings[impl] = {}
        missing = missing_package(impl)
        for mode in modes:
            if missing is not None:
                result.timings[impl][mode] = Timing(na=missing)
                continue
            step = _step(IMPLEMENTATIONS[impl], mode, q, k, v, d_out, case.causal)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    seconds = time_fn(step, warmup=warmup, reps=reps, device=device).median_s
                except Exception as error:  # noqa: BLE001 - a refusal or a failure is a row, never a crash
                    result.timings[impl][mode] = Timing(na=_reason(error, caught))
                    continue
            tflops = case.flops(mode) / seconds / 1e12
            result.timings[impl][mode] = Timing(ms=seconds * 1e3, tflops=tflops,
                                                pct_peak=100 * tflops / peak if peak else None)
    return result


@dataclass
class MemoryResult:
    """Peak bytes of naive attention and of each flash implementation, forward + backward of fresh inputs."""

    case: Case
    naive_bytes: int | None
    flash_bytes: dict[str, int | str]
    """{implementation: peak bytes, or the reason it has none}"""

    @property
    def ratios(self) -> dict[str, float]:
        return {impl: self.naive_bytes / b for impl, b in self.flash_bytes.items()
                if isinstance(b, int) and b > 0 and self.naive_bytes}

    def to_dict(self) -> dict:
        return {**asdict(self.case), "label": self.case.label, "naive_bytes": self.naive_bytes,
                "flash_bytes": self.flash_bytes, "ratios": self.ratios}


def memory_case(device: torch.device, N: int = MEMORY_N) -> Case:
    """The attention check's CUDA workload (B=1, H=8, d=64, fp16, causal), so the two reports agree."""
    return Case("fp16", 64, N, True, B=1, H=8)


def measure_memory(case: Case, impls: tuple[str, ...], device: torch.device) -> MemoryResult:
    """Peak memory of forward + backward, naive (reference.attention.attention) and each of `impls`:
    torch.cuda.max_memory_allocated on CUDA (reset between), the peak of live storages elsewhere."""
    from reference.attention import attention

    q0, k0, v0, _ = _inputs(case, device)
    q0, k0, v0 = (t.detach() for t in (q0, k0, v0))

    def fwd_bwd(fn: Attention) -> None:
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))  # fresh leaves: they count in the footprint
        out = fn(q, k, v, case.causal)  # (B, H, N, d)
        out.backward(torch.ones_like(out))

    def peak(fn: Attention) -> int | str:
        if _missing_for(fn) is not None:
            return _missing_for(fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                measure = cuda_peak_bytes if device.type == "cuda" else peak_live_bytes
                return measure(fwd_bwd, fn)[1]
            except Exception as error:  # noqa: BLE001 - reported, never a crash
                return _reason(error, caught)

    naive = peak(lambda q, k, v, causal: attention(q, k, v, is_causal=causal))
    return MemoryResult(case, naive if isinstance(naive, int) else None,
                        {impl: peak(IMPLEMENTATIONS[impl]) for impl in impls})


def _missing_for(fn: Attention) -> str | None:
    names = [name for name, f in IMPLEMENTATIONS.items() if f is fn]
    return missing_package(names[0]) if names else None
