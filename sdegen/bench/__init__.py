"""Benchmarks (front end; nothing in the library imports this package)."""
