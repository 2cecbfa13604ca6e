"""Model merging: `tunesmith merge CONFIG.yaml OUT_DIR` with mergekit's YAML (docs/merging.md).

config.py parses the recipe, registry.py names the methods (one file each, formula and paper in
its docstring), tensors.py reads and writes safetensors lazily, inputs.py turns each model reference
into a folder (adapters folded into their base first), run.py streams the merge tensor by tensor.
"""
