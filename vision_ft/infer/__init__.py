"""Applying models: embeddings, predictions and evaluation of trained runs."""
