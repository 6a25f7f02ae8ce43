"""Connections of this package's optimizers to other training loops (each an optional
extra: ``lorenza`` itself needs only torch)."""
