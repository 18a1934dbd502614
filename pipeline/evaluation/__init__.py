"""Zero-shot evaluation: classification and retrieval scores as CLIP_benchmark defines them
(zeroshot.py) and the eval sets as Composer evaluators (evaluators.py), shared by training and the
eval command. Imports everything below it but sweeps and the commands."""
