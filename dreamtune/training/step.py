"""The step context: what a hook needs to know about *when* it runs, passed explicitly by the loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .objective import sample_generators


@dataclass(frozen=True)
class StepContext:
    """One micro-batch's place in the run.

    ``positions[i]`` is local sample i's place in its optimizer step's global batch (the same whether the
    batch runs on one process or several, at once or accumulated); ``generators[i]`` is its random stream.
    Samples ``[0, num_instance)`` are instance examples, the rest the class examples paired with them.
    """

    seed: int
    global_step: int  # optimizer steps finished before this micro-batch
    micro_step: int  # micro-batches finished before this one, over the whole run
    accumulated: int  # micro-batches of this optimizer step already done
    positions: tuple[int, ...]
    num_instance: int
    generators: tuple[torch.Generator, ...]



def step_context(seed: int, micro_step: int, batch_len: int, num_instance: int | None, *, batch_size: int,
                 accumulation: int, num_processes: int, rank: int) -> StepContext:
    """Where a micro-batch sits: its step, and each local sample's place in the step's global batch.

    The sampler deals indices round-robin over processes; paired class samples (after the batch's
    ``num_instance`` instance samples) are placed after the step's every instance sample. Generators are
    keyed by (seed, step, place), so N processes or N accumulated micro-batches draw what one batch N
    times larger draws, and a resumed run draws what a straight one would.
    """
    instances = batch_len if num_instance is None else num_instance
    step, accumulated = divmod(micro_step, accumulation)
    step_total = batch_size * num_processes * accumulation

    def place(i: int) -> int:
        return (accumulated * batch_size + i) * num_processes + rank

    positions = [place(i) for i in range(instances)] + [step_total + place(j) for j in range(batch_len - instances)]
    return StepContext(seed=seed, global_step=step, micro_step=micro_step, accumulated=accumulated,
                       positions=tuple(positions), num_instance=instances,
                       generators=tuple(sample_generators(seed, step, positions)))
