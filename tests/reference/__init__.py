"""Literal, slow re-implementations of reference algorithms, used only by tests and benchmarks."""
