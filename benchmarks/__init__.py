"""Load tests for trio_gw against reference peers; run with ``python -m benchmarks``."""
