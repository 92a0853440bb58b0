"""Benchmark commands: their output is recorded in docs/benchmarks.md, never asserted in tests."""
