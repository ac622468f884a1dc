"""Benchmarks: scripts run as `python -m benchmarks.NAME` from the project root (see docs/benchmarks.md)."""
