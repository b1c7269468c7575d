"""Flax modules of AST and the pure functions they are built from."""
