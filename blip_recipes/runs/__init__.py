"""Run bookkeeping: the output folder's lock and run information."""
