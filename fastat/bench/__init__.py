"""Benchmarks as data: timing helpers, op and step cases, and the report writer behind `fastat bench`."""
