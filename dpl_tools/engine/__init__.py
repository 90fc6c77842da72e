"""Engines: detector training loop and batched inference."""
