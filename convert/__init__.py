"""Checkpoint converters: upstream `llm.pt` / `flow.pt` / `hift.pt` -> JAX parameter trees.

`python -m convert MODEL_DIR OUT_DIR` converts every component whose converter is registered in
`convert.registry` and writes one orbax checkpoint per component.
"""
