"""A run's folder: its files by name (files.py), its record of every metric across resumptions
(record.py), the summary and plots drawn from it (summary.py), and a run read back: its saved
config, its sample order and its model (saved.py). Imports everything below it but evaluation,
sweeps and the commands."""
