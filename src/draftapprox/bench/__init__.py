"""Latency and memory benchmarks: `run` measures (one process per job), `report` writes tables and plots."""
