"""The embedded default: generated expression data and a small pretrained CLIP, end to end on a CPU."""
