"""Video: frames read with their time (upright, size-checked as decoded, in their own thread), faces followed as
tracks with smoothed expressions, per-track summaries and timelines, and annotated videos written back."""
