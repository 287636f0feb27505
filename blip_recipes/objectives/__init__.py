"""Training objectives: pure functions of model outputs and targets (no state, no modules)."""
