"""Rendering, image scoring and rewards."""
