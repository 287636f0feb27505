"""The training machinery: the optimizer step and each task's micro-batch, momentum state, optimizer and schedules, building, best weights."""
