"""Benchmarks of the MNIST service against the tutorial and the hardware: `make bench`."""
