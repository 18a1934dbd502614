"""`make shards` that curates: the CLIP-score stage, checked against open_clip scoring the same pairs."""

import json
import os
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
from streaming import StreamingDataset

from data_prep.clip_score import read_scores, score_source
from data_prep.download import finished_shards
from data_prep.sources import ClipScoreConfig, SourcesConfig
from data_prep.to_mds import convert
from pipeline.images import decode_rgb


@pytest.fixture(scope="module")
def scorer(trained, tmp_path_factory) -> str:
    """The model trained on the sample in this session, exported in open_clip's hub layout."""
    from pipeline.export import export
    from pipeline.runs import load_clip

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


def curate(spark, sample_build, scored, tmp_path, clip: ClipScoreConfig) -> tuple:
    """The web source converted with `clip`: (its summary, {key: clip_score} of the stream)."""
    cfg, _ = sample_build
    download, scores_dir, _, _ = scored
    web = cfg.sources["web"]
    source = replace(web, out=str(tmp_path / "web"), filters=replace(web.filters, clip_score=clip))
    curated = SourcesConfig(work_dir=str(tmp_path / "work"), sources={"web": source})
    with open(os.path.join(cfg.work_dir, "prepared", "web", "counts.json")) as f:  # the URL list's counts
        url_counts = {k: v for k, v in json.load(f).items() if k != "fingerprint"}
    scores = {"web": read_scores(spark, scores_dir, download)}
    (summary,) = convert(spark, curated, {"web": (download, url_counts)}, scores)
    stream = StreamingDataset(local=source.out, batch_size=1)
    return summary, {stream[i]["key"]: stream[i]["clip_score"] for i in range(stream.num_samples)}


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
