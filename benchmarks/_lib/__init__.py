"""Helpers the benchmark tools share (not run on their own): the synthetic data and its shifts, scoring,
the published reference loops, a served model, peak-memory probes and the latency report."""
