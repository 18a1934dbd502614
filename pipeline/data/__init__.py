"""Training data: MDS streams -> batches. Our StreamingDataset (sampling.py: virtual epochs in
shard passes, the O(shards) spanner), each stream's compact shard index (shard_index.py), the
augmentation (augment.py) and the dataloader (loader.py). Imports config, common and compat."""
