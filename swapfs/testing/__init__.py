"""Helpers for swapfs's tests, fuzzer and benchmarks (not used by the daemon)."""
