"""Every patch of a pinned library, each with why and the upstream issue, applied explicitly.

Process-wide patches are applied by `apply()`, which the entry points call first (pipeline/train.py,
eval.py, export.py, sweep.py and the test suite); importing any module of pipeline patches nothing.
- streaming_shm_prefix: StreamingDatasets starting together on one machine take their
  shared-memory prefix one at a time (mosaicml/streaming#884, #901).
- fsdp_gloo: FSDP2 sums then divides gradients on gloo, which treats ReduceOp.AVG as a sum
  (torch 2.7; CPU runs only).
Patches scoped to one call are context managers used where needed:
- composer_uploads.threads_for_upload_processes: Composer's RemoteUploader in threads, not
  spawned processes (each re-imports the training script).
- streaming_spanner.shard_spanner: StreamingDataset builds an O(shards) spanner instead of one with
  8 bytes a sample (mosaicml/streaming#792, #771; PR #773 unmerged).
Imports no other package of pipeline.
"""


def apply() -> None:
    """The process-wide patches; applying them again changes nothing. (Imported here, so that
    importing this package imports neither torch nor streaming.)"""
    from pipeline.compat.fsdp_gloo import divide_after_summing_on_gloo
    from pipeline.compat.streaming_shm_prefix import register_prefixes_one_at_a_time

    register_prefixes_one_at_a_time()
    divide_after_summing_on_gloo()
