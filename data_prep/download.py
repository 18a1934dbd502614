"""Run img2dataset for one source. Parquet output keeps every input row, failures included."""

from __future__ import annotations

import dataclasses
import os
import shutil

from data_prep.sources import SourceConfig


def download(name: str, source: SourceConfig, output_folder: str) -> str:
    """Download `source` into `output_folder` (img2dataset parquet shards); returns the folder."""
    # img2dataset otherwise checks the internet for an albumentations update at import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    # A rebuild starts clean. (img2dataset's own incremental_mode="overwrite" deletes the
    # _tmp folder it has just made and then fails to write its shard list there.)
    shutil.rmtree(output_folder, ignore_errors=True)

    img2dataset.download(
        url_list=source.url_list,
        input_format=source.input_format,
        url_col=source.url_col,
        caption_col=source.caption_col,
        save_additional_columns=list(source.extra_columns) or None,  # url is always kept
        output_folder=output_folder,
        output_format="parquet",
        encode_format="jpg",
        enable_wandb=False,
        compute_hash="sha256",
        **dataclasses.asdict(source.img2dataset),
    )
    return output_folder
