"""Synthetic shapes world for training and evaluating the grounding demo model."""
