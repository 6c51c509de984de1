"""Infrastructure every part uses: the config, errors, output paths and owned folders, the numeric-range
validator, atomic writes and file hashes."""
