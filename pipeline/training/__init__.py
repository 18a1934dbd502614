"""What a Trainer is built with besides model and data: optimizer groups (optim.py), DDP / FSDP
(parallel.py), loggers, callbacks and the loss guard (callbacks.py). Imports config, common,
compat, model and algorithms."""
