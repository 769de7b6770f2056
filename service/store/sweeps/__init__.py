"""Sweeps in the store: their rows, and the rule that ends a sweep with its last trial."""
