"""Benchmarks (run as scripts) and the in-memory trainer they and the variography test use."""
