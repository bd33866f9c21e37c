"""Pipeline parallel: schedules as data (GPipe, 1F1B, interleaved 1F1B), a simulator, a model splitter, an executor.

    from optimized.pipeline import gpipe, one_f_one_b, simulate, split, PipelineExecutor

    schedule = one_f_one_b(num_stages=4, num_microbatches=8)
    print(schedule)                                  # rank 0: F0 F1 F2 F3 B0 F4 B1 ...
    sim = simulate(schedule)                         # .timeline, .bubble_fraction, .peak_alive, .plot(path)
    stage = split(model, 4)[rank]                    # this rank's piece: the project's GPT, HF Llama / GPT-2,
                                                     # nn.Sequential, or any model with layout=Layout(...)
    executor = PipelineExecutor(stage, schedule)     # every rank, inside an initialised process group
    result = executor.step(idx, targets)             # .loss on the last rank; gradients in stage.parameters()
"""

from optimized.pipeline.executor import PipelineExecutor, StepResult
from optimized.pipeline.schedules import Action, Schedule, gpipe, interleaved_one_f_one_b, one_f_one_b
from optimized.pipeline.simulate import (
    Deadlock,
    Interval,
    SimulationResult,
    bubble_fraction,
    peak_alive,
    plot_timeline,
    render_timeline,
    simulate,
)
from optimized.pipeline.split import Layout, PipelineStage, causal_mask_inputs, layout_for, split

__all__ = [
    "Action",
    "Deadlock",
    "Interval",
    "Layout",
    "PipelineExecutor",
    "PipelineStage",
    "Schedule",
    "SimulationResult",
    "StepResult",
    "bubble_fraction",
    "causal_mask_inputs",
    "gpipe",
    "interleaved_one_f_one_b",
    "layout_for",
    "one_f_one_b",
    "peak_alive",
    "plot_timeline",
    "render_timeline",
    "simulate",
    "split",
]
