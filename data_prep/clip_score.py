"""CLIP-score stage (Spark): every downloaded image-caption pair scored by a CLIP model, in the executors.

Runs after the download and before MDS, one Spark job per img2dataset shard, each writing
`<work_dir>/clip_scores/<source>/<scorer id>/<shard>/` (parquet: key, clip_score, and the fp16 image
and text embeddings for later stages). A shard whose scores are complete (Spark's `_SUCCESS`) is not
scored again, so a killed build resumes where the scoring stopped; another model, or the same folder
with new weights, has another scorer id and scores everything again. The score is the cosine of the
normalised image and text embeddings, as LAION's `similarity` column and DataComp's CLIP score.

The model: an open_clip name with its weights (`pretrained`: a file or an open_clip tag), or
`local-dir:FOLDER` (open_clip's hub layout, which `pipeline/export.py` writes for a run of this
project). The executors load it once per Python worker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator

from data_prep.download import finished_shards
from data_prep.sources import ClipScoreConfig
from pipeline.common.storage import exists, local_file_stats

SCORE_SCHEMA = "key string, clip_score float, image_embedding binary, text_embedding binary"


def scorer_id(cfg: ClipScoreConfig) -> str:
    """A short digest of the scoring model: its name and weights, with the sizes and times of its
    local files (a `local-dir:` folder, a `pretrained` file), so a retrained export is a new scorer."""
    paths = [cfg.model.removeprefix("local-dir:")] if cfg.model.startswith("local-dir:") else []
    paths += [cfg.pretrained] if cfg.pretrained else []  # an open_clip tag is no file: no stats
    stats = [stat for path in paths for stat in local_file_stats(path)]
    text = json.dumps([cfg.model, cfg.pretrained, stats])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scorer_key(cfg: ClipScoreConfig) -> tuple:
    """What makes two scoring configs the same loaded model (their filter settings aside)."""
    return scorer_id(cfg), cfg.device


def load_scorer(cfg: ClipScoreConfig) -> tuple:
    """(model, preprocess, tokenizer), loaded once per executor Python worker and scorer."""
    return _loaded_scorer(scorer_key(cfg), cfg.model, cfg.pretrained, cfg.device)


@functools.cache
def _loaded_scorer(key: tuple, model: str, pretrained, device: str) -> tuple:
    """A documented cache: the scoring model of a scorer key, for the worker's later batches."""
    import open_clip

    clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    return clip.eval(), preprocess, open_clip.get_tokenizer(model)


def score_batches(batches: Iterator, cfg: ClipScoreConfig) -> Iterator:
    """mapInPandas: (key, jpg, caption) rows -> SCORE_SCHEMA rows."""
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from pipeline.common.images import decode_rgb

    model, preprocess, tokenizer = load_scorer(cfg)
    for frame in batches:
        for start in range(0, len(frame), cfg.batch_size):
            chunk = frame.iloc[start : start + cfg.batch_size]
            images = torch.stack([decode_rgb(jpg, preprocess) for jpg in chunk["jpg"]]).to(cfg.device)
            texts = tokenizer([str(c) for c in chunk["caption"]]).to(cfg.device)
            with torch.no_grad():
                image = F.normalize(model.encode_image(images).float(), dim=-1)
                text = F.normalize(model.encode_text(texts).float(), dim=-1)
            yield pd.DataFrame(
                {
                    "key": chunk["key"].to_numpy(),
                    "clip_score": (image * text).sum(-1).cpu().numpy(),
                    "image_embedding": [e.tobytes() for e in image.half().cpu().numpy()],
                    "text_embedding": [e.tobytes() for e in text.half().cpu().numpy()],
                }
            )


def score_source(spark, name: str, cfg: ClipScoreConfig, download_folder: str, scores_dir: str, show) -> dict:
    """Scores every finished img2dataset shard not scored before; {shards_scored, shards_scored_before}.
    `show(text)` reports progress."""
    from pyspark.sql import functions as F

    shards = finished_shards(download_folder)
    todo = [s for s in shards if not exists(os.path.join(score_folder(scores_dir, s), "_SUCCESS"))]
    for number, shard in enumerate(todo, 1):
        show(f"shard {len(shards) - len(todo) + number}/{len(shards)}")
        rows = spark.read.parquet(shard).filter(F.col("status") == "success").select("key", "jpg", "caption")
        scored = rows.mapInPandas(lambda batches: score_batches(batches, cfg), SCORE_SCHEMA)
        scored.write.mode("overwrite").parquet(score_folder(scores_dir, shard))
    return {"shards_scored": len(todo), "shards_scored_before": len(shards) - len(todo)}


def score_folder(scores_dir: str, shard: str) -> str:
    return os.path.join(scores_dir, os.path.basename(shard).removesuffix(".parquet"))


def read_scores(spark, scores_dir: str, download_folder: str):
    """key, clip_score and the embeddings of every scored row of a source."""
    folders = [score_folder(scores_dir, s) for s in finished_shards(download_folder)]
    return spark.read.schema(SCORE_SCHEMA).parquet(*folders)
