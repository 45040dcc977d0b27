"""Benchmarks: `cpu` (one fresh process per run, against diffusers on the same weights) and `device` (GPU)."""
