"""The typed configs and their loader: one schema per entry point (schema.py: TrainConfig,
EvalConfig, SweepConfig and their sections) and the YAML loader (loader.py: `base:`, `key=value`
overrides, unknown keys named with the valid ones). Torch-free, so a bad config fails in a fraction
of a second and data_prep can use the loader. Imports only pipeline.config itself."""
