"""Run img2dataset on a source's prepared URL list. Parquet output keeps every row, failures included.

img2dataset's incremental mode is kept: a shard counts as done once its `_stats.json` exists, so
re-running the same command after a kill downloads only the shards that were not finished.
"""

from __future__ import annotations

import dataclasses
import os
from glob import glob

from data_prep.sources import SourceConfig


def download(source: SourceConfig, url_list_dir: str, output_folder: str) -> dict:
    """Download into `output_folder`; returns {"shards": done before this run, "fetched": shards this run}."""
    # img2dataset otherwise checks the internet for an albumentations update at import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    done_before = len(finished_shards(output_folder))
    extra = list(source.recorded_columns) + (["captions"] if source.input_format == "coco_captions" else [])
    img2dataset.download(
        url_list=url_list_dir,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=extra or None,  # url is always kept
        output_folder=output_folder,
        output_format="parquet",
        encode_format="jpg",
        enable_wandb=False,
        compute_hash="sha256",
        incremental_mode="incremental",
        **dataclasses.asdict(source.img2dataset),
    )
    return {"shards_done_before": done_before, "shards_fetched": len(finished_shards(output_folder)) - done_before}


def finished_shards(output_folder: str) -> list:
    """The parquet shards img2dataset finished (it writes the stats file after the shard)."""
    return sorted(
        path[: -len("_stats.json")] + ".parquet" for path in glob(os.path.join(output_folder, "*_stats.json"))
    )
