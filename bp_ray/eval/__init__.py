"""Evaluation: rewrite, render with several seeds, score, and compare systems."""
