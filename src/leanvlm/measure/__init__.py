"""Measurement: analytic and counted FLOPs, timed benchmarks, and how much the decoder changes vision tokens."""
