"""What both halves (data_prep and training) need, torch-free: the one module that talks to object
storage (storage.py), the one way images are decoded (images.py), console and markdown tables
(tables.py) and the intervals reports give over seeds (intervals.py). Imports nothing of pipeline."""
