"""`make shards` that curates: the CLIP-score stage, checked against open_clip scoring the same pairs."""

import hashlib
import io
import json
import os
import shutil
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from streaming import StreamingDataset

from data_prep.clip_score import read_scores, score_source, scorer_id
from data_prep.download import finished_shards
from data_prep.sources import (
    ClipScoreConfig,
    DecontaminateConfig,
    FilterConfig,
    SemanticDedupConfig,
    SourceConfig,
    SourcesConfig,
)
from data_prep.to_mds import convert
from pipeline.common.images import decode_rgb


@pytest.fixture(scope="module")
def scorer(trained, tmp_path_factory) -> str:
    """The model trained on the sample in this session, exported in open_clip's hub layout."""
    from pipeline.model.export import export
    from pipeline.run.saved import load_clip

    eval_cfg, checkpoint, _ = trained
    clip, _, _, model = load_clip(replace(eval_cfg, load_path=checkpoint))
    folder = str(tmp_path_factory.mktemp("scorer") / "demo")
    export(clip, model, folder)
    return f"local-dir:{folder}"


def open_clip_scores(model_name: str, download_folder: str) -> dict:
    """{key: image-caption cosine} of every downloaded pair, by open_clip directly (the reference)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    rows = [
        row
        for shard in finished_shards(download_folder)
        for row in pq.read_table(shard, columns=["key", "jpg", "caption", "status"]).to_pylist()
        if row["status"] == "success"
    ]
    scores = {}
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            chunk = rows[start : start + 256]
            image = model.eval().encode_image(torch.stack([decode_rgb(r["jpg"], preprocess) for r in chunk]))
            text = model.encode_text(tokenizer([r["caption"] for r in chunk]))
            cosine = torch.nn.functional.cosine_similarity(image, text)
            scores.update({r["key"]: float(c) for r, c in zip(chunk, cosine)})
    return scores


@pytest.fixture(scope="module")
def scored(spark, sample_build, scorer, tmp_path_factory):
    """The sample's web source scored by the stage: (download folder, scores dir, stage stats, the reference)."""
    cfg, _ = sample_build
    download = os.path.join(cfg.work_dir, "img2dataset", "web")
    scores_dir = str(tmp_path_factory.mktemp("clip_scores") / "web")
    stats = score_source(spark, "web", ClipScoreConfig(model=scorer), download, scores_dir, show=lambda text: None)
    return download, scores_dir, stats, open_clip_scores(scorer, download)


def test_the_stage_scores_every_pair_as_open_clip_does_and_a_rerun_scores_nothing_again(spark, scored, scorer):
    download, scores_dir, stats, reference = scored
    assert stats == {"shards_scored": 1, "shards_scored_before": 0}
    ours = {row["key"]: row["clip_score"] for row in read_scores(spark, scores_dir, download).collect()}
    assert ours.keys() == reference.keys() and len(ours) > 3000
    assert ours == pytest.approx(reference, abs=2e-5)
    assert len(set(ours.values())) > 100  # a trained model tells pairs apart
    again = score_source(spark, "web", ClipScoreConfig(model=scorer), download, scores_dir, show=lambda text: None)
    assert again == {"shards_scored": 0, "shards_scored_before": 1}  # a killed build resumes past scored shards


def test_a_new_model_or_retrained_weights_get_a_new_scorer_id_so_no_stale_score_is_reused(scorer, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(scorer.removeprefix("local-dir:"), copy)
    first = scorer_id(ClipScoreConfig(model=f"local-dir:{copy}"))
    assert scorer_id(ClipScoreConfig(model=f"local-dir:{copy}", top_fraction=0.3)) == first  # a filter setting
    assert scorer_id(ClipScoreConfig(model="ViT-B-32", pretrained="openai")) != first
    weights = copy / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # the same folder, retrained
    assert scorer_id(ClipScoreConfig(model=f"local-dir:{copy}")) != first


def convert_web(spark, sample_build, tmp_path, scores: dict, filters: FilterConfig, **settings) -> tuple:
    """The sample's web download converted again with `filters` and `settings`: (summary, stream)."""
    cfg, _ = sample_build
    source = replace(cfg.sources["web"], out=str(tmp_path / "web"), filters=filters)
    curated = SourcesConfig(work_dir=str(tmp_path / "work"), sources={"web": source}, **settings)
    with open(os.path.join(cfg.work_dir, "prepared", "web", "counts.json")) as f:  # the URL list's counts
        url_counts = {k: v for k, v in json.load(f).items() if k != "fingerprint"}
    download = os.path.join(cfg.work_dir, "img2dataset", "web")
    (summary,) = convert(spark, curated, {"web": (download, url_counts)}, scores)
    return summary, StreamingDataset(local=source.out, batch_size=1, shuffle=False)


def curate(spark, sample_build, scored, tmp_path, clip: ClipScoreConfig) -> tuple:
    """The web source converted with `clip`: (its summary, {key: clip_score} of the stream)."""
    cfg, _ = sample_build
    download, scores_dir, _, _ = scored
    filters = replace(cfg.sources["web"].filters, clip_score=clip)
    scores = {"web": read_scores(spark, scores_dir, download)}
    summary, stream = convert_web(spark, sample_build, tmp_path, scores, filters)
    return summary, {stream[i]["key"]: stream[i]["clip_score"] for i in range(stream.num_samples)}


def test_the_samples_eval_copies_of_the_same_file_match_the_eval_streams_downloaded_sha256(
    spark, sample_build, tmp_path
):
    """The held-out emoji the sample plants in its web list, through its real download, no scorer:
    a copy of the same file matches the eval stream's `sha256` (of the downloaded bytes; both stored
    JPEGs were re-encoded by img2dataset), and a re-encoded copy is left for the embedding stage."""
    cfg, summaries = sample_build
    web_test = cfg.sources["web_test"].out
    decontaminate = DecontaminateConfig(eval_sets=[web_test])
    summary, _ = convert_web(spark, sample_build, tmp_path, {}, cfg.sources["web"].filters, decontaminate=decontaminate)
    training = StreamingDataset(local=cfg.sources["web"].out, batch_size=1, shuffle=False)
    training = [training[i] for i in range(training.num_samples)]
    evals = StreamingDataset(local=web_test, batch_size=1, shuffle=False)
    eval_index = {evals[i]["sha256"]: i for i in range(evals.num_samples)}
    # The reference: every training row whose downloaded bytes an eval image had (a few emoji render alike).
    expected = {row["key"]: eval_index[row["sha256"]] for row in training if row["sha256"] in eval_index}
    planted = {row["url"].rsplit("/", 1)[1]: row["key"] for row in training if "/planted/" in row["url"]}
    assert {planted["eval0.png"], planted["eval2.png"]} <= expected.keys()  # the same file
    assert not {planted["eval1.jpg"], planted["eval3.jpg"]} & expected.keys()  # re-encoded: other bytes
    assert summary["eval_overlap"] == len(expected)
    assert summary["written"] == summaries["web"]["written"] - len(expected)
    listed = {o["key"]: o for o in summary["eval_overlaps"]}
    assert {key: o["eval_index"] for key, o in listed.items()} == expected
    assert {(o["eval_set"], o["similarity"]) for o in listed.values()} == {(web_test, 1.0)}
    by_key = {row["key"]: row for row in training}
    for key in (planted["eval0.png"], planted["eval2.png"]):
        assert evals[expected[key]]["caption"] == by_key[key]["caption"]
        assert evals[expected[key]]["image"] == by_key[key]["image"]  # img2dataset re-encodes alike


def test_min_drops_exactly_the_pairs_below_and_keeps_the_score_as_a_column(spark, sample_build, scored, tmp_path):
    cfg, summaries = sample_build
    reference = scored[3]
    uncurated = StreamingDataset(local=cfg.sources["web"].out, batch_size=1)
    passing = {uncurated[i]["key"] for i in range(uncurated.num_samples)}  # every other filter passed
    bar = sorted(reference[k] for k in passing)[len(passing) // 3]
    summary, stream = curate(spark, sample_build, scored, tmp_path, ClipScoreConfig(model="unused", min=bar))
    below = {k for k in passing if reference[k] < bar}
    assert summary["low_clip_score"] == len(below) > 0
    assert set(stream) == passing - below and summary["written"] == len(stream)
    assert {k: stream[k] for k in stream} == pytest.approx({k: reference[k] for k in stream}, abs=2e-5)
    stage_stats = ("written", "out", "shards_done_before", "shards_fetched")
    other = {k: v for k, v in summaries["web"].items() if k not in stage_stats}
    assert {k: summary.get(k, 0) for k in other} == other  # the other reasons' counts are unchanged


def test_top_fraction_keeps_exactly_that_share_the_best_scored(spark, sample_build, scored, tmp_path):
    cfg, summaries = sample_build
    reference, passing = scored[3], summaries["web"]["written"]
    summary, stream = curate(spark, sample_build, scored, tmp_path, ClipScoreConfig(model="unused", top_fraction=0.3))
    assert summary["written"] == len(stream) == round(0.3 * passing)
    assert summary["low_clip_score"] == passing - round(0.3 * passing)
    uncurated = StreamingDataset(local=cfg.sources["web"].out, batch_size=1)
    dropped = {uncurated[i]["key"] for i in range(uncurated.num_samples)} - set(stream)
    assert min(reference[k] for k in stream) >= max(reference[k] for k in dropped)


def reencoded(jpeg: bytes) -> bytes:
    """The same picture resized to 3/4 and saved again at a lower quality: other bytes, other sha256."""
    image = decode_rgb(jpeg)
    buffer = io.BytesIO()
    image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BICUBIC).save(
        buffer, "JPEG", quality=70
    )
    return buffer.getvalue()


def write_download(folder, images: list) -> str:
    """img2dataset's output (one finished shard) for (jpeg, caption) pairs, keys in list order."""
    rows = []
    for i, (jpeg, caption) in enumerate(images):
        width, height = Image.open(io.BytesIO(jpeg)).size
        sha256 = hashlib.sha256(jpeg).hexdigest()
        rows.append(
            dict(
                key=f"{i:09d}",
                url=f"u{i}",
                caption=caption,
                jpg=jpeg,
                sha256=sha256,
                status="success",
                width=width,
                height=height,
            )
        )
    os.makedirs(folder)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "00000.parquet"))
    with open(os.path.join(folder, "00000_stats.json"), "w") as f:
        f.write("{}")
    return str(folder)


def stream_images(out: str, count: int) -> list:
    dataset = StreamingDataset(local=out, batch_size=1, shuffle=False)
    return [(dataset[i]["image"], dataset[i]["caption"]) for i in range(count)]


def reference_embeddings(model_name: str, images: list) -> torch.Tensor:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    with torch.no_grad():
        pixels = torch.stack([decode_rgb(jpeg, preprocess) for jpeg, _ in images])
        return torch.nn.functional.normalize(model.eval().encode_image(pixels), dim=-1)


def curated_download(spark, tmp_path, scorer, images: list, **settings) -> dict:
    """The summary of `images` downloaded, scored by `scorer` and converted with `settings`."""
    download = write_download(tmp_path / "i2d", images)
    clip = ClipScoreConfig(model=scorer)
    score_source(spark, "web", clip, download, str(tmp_path / "scores"), show=lambda text: None)
    filters = FilterConfig(clip_score=clip, dedup_semantic=settings.pop("dedup_semantic", None))
    source = SourceConfig(url_list="unused", out=str(tmp_path / "web"), filters=filters)
    cfg = SourcesConfig(work_dir=str(tmp_path / "work"), sources={"web": source}, **settings)
    scores = {"web": read_scores(spark, str(tmp_path / "scores"), download)}
    (summary,) = convert(spark, cfg, {"web": (download, {"urls": len(images), "to_download": len(images)})}, scores)
    return summary


def first_in_order_duplicates(embeddings: torch.Tensor, threshold: float, rows: list) -> set:
    """Brute force over every pair (no clustering): rows whose cosine with an earlier row reaches the bar."""
    similarity = torch.triu(embeddings[rows] @ embeddings[rows].T, 1)
    return {rows[j] for j in range(len(rows)) if (similarity[:, j] >= threshold).any()}


def test_exact_copies_are_caught_by_sha256_and_reencoded_ones_only_by_semantic_dedup(
    spark, sample_build, scorer, tmp_path
):
    cfg, _ = sample_build
    base = stream_images(cfg.sources["web"].out, 60)
    exact = [base[i] for i in (5, 6, 7)]
    resized = [(reencoded(base[i][0]), base[i][1] + " again") for i in (3, 10, 20, 30, 40)]
    images = base + exact + resized
    embeddings = reference_embeddings(scorer, images)
    copies = range(len(base) + len(exact), len(images))
    originals = (3, 10, 20, 30, 40)
    bar = min(float(embeddings[c] @ embeddings[o]) for c, o in zip(copies, originals)) - 1e-4
    unique = [i for i in range(len(images)) if i not in range(len(base), len(base) + len(exact))]
    expected = first_in_order_duplicates(embeddings, bar, unique)
    assert set(copies) <= expected  # every re-encoded copy is a semantic duplicate of an earlier row

    without = curated_download(spark, tmp_path / "without", scorer, images)
    assert without["duplicate_image"] == 3 and "semantic_duplicate" not in without  # sha256 misses re-encodings
    dedup = SemanticDedupConfig(threshold=bar, clusters=3)
    summary = curated_download(spark, tmp_path / "with", scorer, images, dedup_semantic=dedup)
    assert summary["duplicate_image"] == 3
    assert summary["semantic_duplicate"] == len(expected)
    kept = {int(k) for k in _stream_keys(str(tmp_path / "with" / "web"))}
    assert kept == set(unique) - expected  # the first of each group, in source order, is kept


def test_eval_matching_yields_only_rows_that_match_in_types_arrow_takes():
    """A batch with no match yields nothing: an empty frame's columns would be float64, and Spark's Arrow
    conversion to the string columns fails (as it did in `make demo`'s curation step)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from data_prep.curation import nearest_eval_images

    rows = np.eye(4, dtype=np.float16)
    frame = pd.DataFrame(
        {"_source": ["web"] * 4, "key": ["a", "b", "c", "d"], "image_embedding": [r.tobytes() for r in rows]}
    )
    matrix = np.eye(4, dtype=np.float32)[:2]  # two eval images: the same as rows a and b
    batches = [frame.iloc[2:], frame, frame.iloc[:0]]
    found = list(nearest_eval_images(batches, names=["ev", "ev"], indices=[0, 1], matrix=matrix, threshold=0.99))
    assert len(found) == 1 and found[0]["key"].tolist() == ["a", "b"]
    schema = pa.schema(
        [("_source", pa.string()), ("key", pa.string()), ("eval_set", pa.string()), ("eval_index", pa.int64())]
        + [("similarity", pa.float32())]
    )
    table = pa.Table.from_pandas(found[0], schema=schema, preserve_index=False)
    assert table.column("eval_index").to_pylist() == [0, 1] and table.column("similarity").to_pylist() == [1.0, 1.0]


def _stream_keys(out: str) -> list:
    dataset = StreamingDataset(local=out, batch_size=1, shuffle=False)
    return [dataset[i]["key"] for i in range(dataset.num_samples)]


def test_eval_images_planted_in_the_training_list_are_dropped_and_listed(spark, sample_build, scorer, tmp_path):
    cfg, _ = sample_build
    evals = stream_images(cfg.sources["web_test"].out, 365)
    training = stream_images(cfg.sources["web"].out, 40)
    planted = {
        40: evals[2],
        41: evals[7],
        42: (reencoded(evals[11][0]), "eval 11"),
        43: (reencoded(evals[19][0]), "eval 19"),
    }
    images = training + list(planted.values())
    eval_embeddings = reference_embeddings(scorer, evals)
    embeddings = reference_embeddings(scorer, images)
    nearest = (embeddings @ eval_embeddings.T).max(dim=1)
    bar = float(min(nearest.values[42], nearest.values[43])) - 1e-4
    expected = {i for i in range(len(images)) if nearest.values[i] >= bar}
    assert set(planted) <= expected

    decontaminate = DecontaminateConfig(eval_sets=[cfg.sources["web_test"].out], threshold=bar)
    summary = curated_download(spark, tmp_path, scorer, images, decontaminate=decontaminate)
    assert summary["eval_overlap"] == len(expected)
    listed = {int(o["key"]): o for o in summary["eval_overlaps"]}
    assert set(listed) == expected
    assert [(listed[k]["eval_index"], listed[k]["similarity"]) for k in (40, 41)] == [
        (2, 1.0),
        (7, 1.0),
    ]  # the same bytes
    assert {listed[k]["eval_index"] for k in (42, 43)} <= {int(i) for i in nearest.indices[[42, 43]]} | {11, 19}
    assert not set(planted) & {int(k) for k in _stream_keys(str(tmp_path / "web"))}
