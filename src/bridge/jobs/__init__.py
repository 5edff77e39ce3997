"""The job API of seed 003: structured output validated with msgspec, on the core streams."""
