"""A run's configuration: the sections a run needs around the method's own (backbone, data, optimiser, run), the
``compat`` mode, loading from YAML, ``--set`` text and typed values, and the generated configuration reference."""
