"""What the CLIP-score stage's scores and embeddings decide (Spark), after the sha256 dedup:

- eval_overlap: the image is in an eval set (the same bytes, or an embedding within a cosine);
- semantic_duplicate: SemDeDup, k-means on the image embeddings, then pairs within each cluster;
- low_clip_score: below `min`, or outside the best `top_fraction`.

Each takes the narrow decision table (_source, _rank, key, sha256, _reason) and marks rows whose
_reason is still empty, so every row keeps one reason: the first that applies, in that order.
"""

from __future__ import annotations

import hashlib
from functools import partial

import numpy as np

from data_prep.clip_score import scorer_key
from data_prep.sources import ClipScoreConfig, DecontaminateConfig, SemanticDedupConfig

OVERLAP_SCHEMA = "_source string, key string, eval_set string, eval_index long, similarity float"


def mark(narrow, hits, reason: str):
    """`reason` for the rows of `hits` (_source, key) that have none yet."""
    from pyspark.sql import functions as F

    hit = hits.select("_source", "key", F.lit(True).alias("_hit")).dropDuplicates(["_source", "key"])
    narrow = narrow.join(hit, ["_source", "key"], "left")
    marked = F.when(F.col("_reason").isNull() & F.col("_hit"), reason).otherwise(F.col("_reason"))
    return narrow.withColumn("_reason", marked).drop("_hit")


def candidates(narrow, embeddings):
    """Rows with no reason yet, with their image embedding (sources that were scored only)."""
    from pyspark.sql import functions as F

    return narrow.filter(F.col("_reason").isNull()).join(embeddings, ["_source", "key"])


def embed(arrays: np.ndarray) -> np.ndarray:
    """fp16 embedding bytes (the CLIP-score stage's) -> unit float32 rows."""
    rows = np.stack([np.frombuffer(b, dtype=np.float16) for b in arrays]).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# Eval-set decontamination
# ---------------------------------------------------------------------------


def eval_images(cfg: DecontaminateConfig) -> list:
    """[(eval set, index, image bytes, sha256s)] of every image of the eval streams. The sha256s are
    those of the stored bytes and, for a stream `make shards` wrote, of the bytes it downloaded."""
    from streaming import StreamingDataset

    images = []
    for path in cfg.eval_sets:
        dataset = StreamingDataset(local=path, batch_size=1, shuffle=False)
        for i in range(dataset.num_samples):
            sample = dataset[i]
            digests = {hashlib.sha256(sample["image"]).hexdigest(), sample.get("sha256")} - {None}
            images.append((path, i, sample["image"], digests))
    return images


def embed_images(images: list, clip: ClipScoreConfig) -> np.ndarray:
    """Unit image embeddings of `images` by the scoring model, as the executors compute them."""
    import torch
    import torch.nn.functional as F

    from data_prep.clip_score import load_scorer
    from pipeline.common.images import decode_rgb

    model, preprocess, _ = load_scorer(clip)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), clip.batch_size):
            pixels = torch.stack(
                [decode_rgb(data, preprocess) for _, _, data, _ in images[start : start + clip.batch_size]]
            )
            chunks.append(F.normalize(model.encode_image(pixels.to(clip.device)).float(), dim=-1).half().cpu().numpy())
    return embed([row.tobytes() for chunk in chunks for row in chunk])


def nearest_eval_images(batches, names: list, indices: list, matrix: np.ndarray, threshold: float):
    """mapInPandas: candidates -> OVERLAP_SCHEMA rows of those whose nearest eval image reaches `threshold`."""
    import pandas as pd

    for frame in batches:
        if frame.empty:
            continue
        similarity = embed(frame["image_embedding"]) @ matrix.T
        best = similarity.argmax(axis=1)
        close = similarity[np.arange(len(frame)), best] >= threshold
        if not close.any():  # an empty frame's list columns are float64, which Arrow cannot make strings of
            continue
        yield pd.DataFrame(
            {
                "_source": frame["_source"][close].to_numpy(),
                "key": frame["key"][close].to_numpy(),
                "eval_set": [names[b] for b in best[close]],
                "eval_index": [indices[b] for b in best[close]],
                "similarity": similarity[np.arange(len(frame)), best][close].astype(np.float32),
            }
        )


def eval_overlaps(spark, narrow, embeddings: dict, clips: dict, cfg: DecontaminateConfig):
    """(_source, key, eval_set, eval_index, similarity) of the training rows found in the eval sets:
    by sha256 in every source, by embedding in the sources scored (`embeddings`, `clips` by source)."""
    from pyspark.sql import functions as F

    images = eval_images(cfg)
    by_hash = spark.createDataFrame(
        [(digest, name, i) for name, i, _, digests in images for digest in digests],
        "sha256 string, eval_set string, eval_index long",
    )
    pending = narrow.filter(F.col("_reason").isNull())
    found = pending.join(by_hash, "sha256").select(
        "_source", "key", "eval_set", "eval_index", F.lit(1.0).cast("float").alias("similarity")
    )
    names, indices = [name for name, _, _, _ in images], [i for _, i, _, _ in images]
    matrices: dict = {}  # the eval images embedded once per scoring model
    for source, frame in embeddings.items():
        key = scorer_key(clips[source])
        if key not in matrices:
            matrices[key] = embed_images(images, clips[source])
        matrix = matrices[key]
        rows = candidates(pending.filter(F.col("_source") == source), frame)
        near = rows.mapInPandas(
            partial(nearest_eval_images, names=names, indices=indices, matrix=matrix, threshold=cfg.threshold),
            OVERLAP_SCHEMA,
        )
        found = found.unionByName(near)
    return found.dropDuplicates(["_source", "key"])


# ---------------------------------------------------------------------------
# Semantic dedup (SemDeDup)
# ---------------------------------------------------------------------------


def cluster_duplicates(frame, threshold: float):
    """applyInPandas over one cluster: the rows whose cosine with an earlier row reaches `threshold`."""
    frame = frame.sort_values(["_rank", "key"])
    rows = embed(frame["image_embedding"])
    similarity = np.triu(rows @ rows.T, 1)
    return frame.loc[(similarity >= threshold).any(axis=0), ["_source", "key"]]


def semantic_duplicates(rows, dedup: SemanticDedupConfig, across_sources: bool):
    """(_source, key) of the semantic duplicates among `rows` (candidates with image_embedding)."""
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    floats = F.udf(lambda data: embed([data])[0].tolist(), "array<float>")
    vectors = rows.withColumn("_features", array_to_vector(floats("image_embedding")))
    count = vectors.count()
    if count < 2:
        return rows.select("_source", "key").limit(0)
    kmeans = KMeans(k=min(dedup.clusters, count), seed=dedup.seed, featuresCol="_features", predictionCol="_cluster")
    clustered = kmeans.fit(vectors).transform(vectors).select("_cluster", "_source", "_rank", "key", "image_embedding")
    group = ["_cluster"] if across_sources else ["_cluster", "_source"]
    threshold = dedup.threshold
    return clustered.groupBy(*group).applyInPandas(
        lambda frame: cluster_duplicates(frame, threshold), "_source string, key string"
    )


# ---------------------------------------------------------------------------
# CLIP-score filter
# ---------------------------------------------------------------------------


def low_clip_scores(narrow, name: str, scores, clip: ClipScoreConfig):
    """(_source, key) of `name`'s rows that pass every other filter yet score below `clip.min`, or
    outside the best `clip.top_fraction` of those that pass (exactly that share, rounded; ties by key)."""
    from pyspark.sql import functions as F

    rows = narrow.filter((F.col("_source") == name) & F.col("_reason").isNull()).join(
        scores.select("key", "clip_score"), "key"
    )
    low = rows.filter(F.col("clip_score") < clip.min) if clip.min is not None else rows.limit(0)
    if clip.top_fraction is not None:
        passing = rows.filter(F.col("clip_score") >= clip.min) if clip.min is not None else rows
        ranked = passing.select("key", "clip_score").orderBy(F.desc("clip_score"), "key")
        keep = round(ranked.count() * clip.top_fraction)
        beyond = ranked.rdd.zipWithIndex().filter(lambda pair: pair[1] >= keep).map(lambda pair: (pair[0]["key"],))
        low = low.select("key").unionByName(beyond.toDF("key string"))
    return low.select(F.lit(name).alias("_source"), "key")
