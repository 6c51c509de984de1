"""Datasets, their index format, preprocessing and samplers."""
