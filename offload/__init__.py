"""Where each part of the model runs: the placement planner and the CPU expert workers."""
