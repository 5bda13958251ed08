"""The step context: what a hook needs to know about *when* it runs, passed explicitly by the loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

