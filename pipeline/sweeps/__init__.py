"""Many runs of one recipe: a sweep's runs (grid.py), its report (report.py) and scaling-law fits
(scaling.py, also a command: python -m pipeline.sweeps.scaling). Imports any package but the
commands."""
