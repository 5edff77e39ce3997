"""Seed 004's micro-batching: `/generate` requests run together through a slow batch model."""
