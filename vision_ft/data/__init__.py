"""Data: sources, transforms and the input pipeline."""
