"""Datasets, formats, synthetic generators, transforms and samplers."""
