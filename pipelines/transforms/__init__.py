"""The preprocessing job's Beam transforms, one module per stage (pipelines.preprocess wires them)."""
