"""What every run needs around its training loop: the run directory and checkpoints, final weights,
lineage, tracking, preemption, the non-finite guard, distributed set-up, the start-up plan."""
