"""Datasets, their index format, preprocessing and samplers; the one image opener, face detection and the crop
policy, and the preparation of the official distributions."""
