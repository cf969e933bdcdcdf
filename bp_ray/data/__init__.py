"""Data stages: prompt sources, the synthetic DiffusionDB-shaped corpus, and the Ray Data pipeline."""
