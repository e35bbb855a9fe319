"""Input/output helpers that need no torch: `.pt` checkpoint reading and HyperPyYAML parsing."""
