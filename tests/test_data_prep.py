import glob
import io
import json
import os
import shutil
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streaming import StreamingDataset

from data_prep.sample import sample_files
from data_prep.sources import SourceConfig, SourcesConfig
from data_prep.to_mds import BASE_COLUMNS, convert

DROP_REASONS = [
    "failed_to_download",
    "failed_to_resize",
    "caption_too_short",
    "duplicate_url",
    "duplicate_image",
    "image_too_small",
    "filtered_by_where",
]


def test_img2dataset_downloaded_from_loopback(sample_build):
    cfg, _ = sample_build
    shards = glob.glob(os.path.join(cfg.work_dir, "img2dataset", "web", "*.parquet"))
    assert shards
    rows = pq.read_table(shards[0], columns=["url", "status"]).to_pylist()
    assert all(row["url"].startswith("http://127.0.0.1:") for row in rows)
    assert sum(row["status"] == "success" for row in rows) > 0.9 * len(rows)


def test_the_sample_is_written_once_per_config_and_served_again_as_written(sample_build, tmp_path):
    cfg, _ = sample_build
    files = os.path.join(cfg.work_dir, "sample_files")
    image = os.path.join(files, "emoji", "00000.png")
    written = os.stat(image).st_mtime_ns
    rows = sample_files(replace(cfg.sample, port=1), files)  # a re-run, on another port
    assert os.stat(image).st_mtime_ns == written  # nothing rendered again
    served = pq.read_table(cfg.sources["web"].url_list).to_pylist()  # "http://127.0.0.1:<port>/emoji/..."
    assert [row["url"] for row in rows["web"]] == [row["url"].split("/", 3)[3] for row in served]
    assert [row["caption"] for row in rows["web"]] == [row["caption"] for row in served]

    copy = shutil.copytree(files, tmp_path / "files")
    more = replace(cfg.sample, fashion_train=cfg.sample.fashion_train + 1)
    assert len(sample_files(more, copy)["coco"]) == len(rows["coco"]) + 1  # another config: written again
    assert os.stat(os.path.join(copy, "emoji", "00000.png")).st_mtime_ns != written


@pytest.mark.parametrize("source", ["web", "coco"])
def test_bad_rows_are_counted_not_lost(sample_build, source):
    cfg, summaries = sample_build
    summary, sample = summaries[source], cfg.sample
    assert summary["failed_to_download"] == sample.missing_urls
    assert summary["failed_to_resize"] == sample.corrupt_images  # undecodable bytes
    assert summary["caption_too_short"] == sample.empty_captions
    assert summary["duplicate_url"] == sample.duplicate_urls
    assert summary["written"] + sum(summary.get(r, 0) for r in DROP_REASONS) == summary["urls"]
    assert summary["written"] > 0.9 * summary["urls"]


def test_summary_sits_next_to_the_shards(sample_build):
    cfg, summaries = sample_build
    with open(os.path.join(cfg.sources["coco"].out, "summary.json")) as f:
        assert json.load(f)["written"] == summaries["coco"]["written"]


def test_heldout_splits_meet_training_only_where_copies_were_planted(sample_build):
    cfg, summaries = sample_build
    train = StreamingDataset(local=cfg.sources["web"].out, batch_size=1)
    test = StreamingDataset(local=cfg.sources["web_test"].out, batch_size=1)
    train_captions = {train[i]["caption"] for i in range(train.num_samples)}
    test_captions = {test[i]["caption"] for i in range(test.num_samples)}
    planted = {train[i]["caption"] for i in range(train.num_samples) if "/planted/eval" in train[i]["url"]}
    assert summaries["web_test"]["written"] > 300
    assert len(planted) == cfg.sample.eval_copies  # what `make demo`'s curation step finds
    assert train_captions & test_captions == planted


def test_mds_round_trip_is_exact(sample_build):
    cfg, summaries = sample_build
    out = cfg.sources["coco"].out
    dataset = StreamingDataset(local=out, batch_size=1)
    assert dataset.num_samples == summaries["coco"]["written"]
    downloaded = {}
    for shard in glob.glob(os.path.join(cfg.work_dir, "img2dataset", "coco", "*.parquet")):
        for row in pq.read_table(shard, columns=["key", "jpg", "caption"]).to_pylist():
            downloaded[row["key"]] = row
    labels = set()
    for i in range(0, dataset.num_samples, 37):
        sample = dataset[i]
        assert set(BASE_COLUMNS) | {"label"} <= set(sample)
        assert sample["image"] == downloaded[sample["key"]]["jpg"]
        assert sample["caption"] == downloaded[sample["key"]]["caption"].strip()
        image = Image.open(io.BytesIO(sample["image"]))
        assert image.format == "JPEG" and image.size == (sample["width"], sample["height"])
        assert image.size == (28, 28)  # small images are never enlarged
        assert sample["source"] == "coco"
        labels.add(sample["label"])
    assert labels <= set(range(10)) and len(labels) > 5


def _jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _img2dataset_output(folder, rows: list) -> None:
    """What img2dataset leaves for one finished shard: its parquet and its stats file."""
    folder.mkdir(parents=True)
    rows = [{"status": "success", "width": 40, "height": 30, "url": f"u{row['key']}", **row} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    (folder / "00000_stats.json").write_text("{}")


def _convert(spark, tmp_path, sources: dict, sent: int = 0, **cfg_fields) -> dict:
    """convert() on the img2dataset outputs under tmp_path/i2d, as if `sent` URLs (default: all) were sent."""
    cfg = SourcesConfig(work_dir=str(tmp_path / "work"), sources=sources, **cfg_fields)
    downloads = {}
    for name in sources:
        folder = tmp_path / "i2d" / name
        rows = sent or pq.read_metadata(folder / "00000.parquet").num_rows
        downloads[name] = (str(folder), {"urls": rows, "to_download": rows})
    return {s["source"]: s for s in convert(spark, cfg, downloads)}


def test_image_filters_and_hash_dedup_are_counted(spark, tmp_path):
    """Rows img2dataset marked success can still be tiny or the same image as another."""
    red, blue = _jpeg("red"), _jpeg("blue")
    rows = [
        dict(key="0", caption="a red square", jpg=red, sha256="h0", recaption="a square, red"),
        dict(key="1", caption="a blue square", jpg=blue, sha256="h1", recaption=None),
        dict(key="2", caption="the same red square", jpg=red, sha256="h0"),
        dict(key="3", caption="again", jpg=red, sha256="h0"),
        dict(key="4", caption="tiny", jpg=_jpeg("green"), sha256="h4", width=4, height=4),
        dict(key="5", caption="tiny and red", jpg=red, sha256="h0", width=4, height=4),
        dict(key="6", caption="gone", jpg=None, sha256=None, status="failed_to_download"),
        dict(key="7", caption="broken", jpg=None, sha256=None, status="failed_to_resize"),
    ]
    _img2dataset_output(tmp_path / "i2d" / "unit", rows)
    source = SourceConfig(url_list="unused", out=str(tmp_path / "mds"), caption_columns=["recaption"])
    source.filters.min_image_size = 16
    summary = _convert(spark, tmp_path, {"unit": source})["unit"]
    assert summary["written"] == 2 and summary["urls"] == 8
    assert summary["duplicate_image"] == 2 and summary["image_too_small"] == 2
    assert summary["failed_to_download"] == 1 and summary["failed_to_resize"] == 1
    dataset = StreamingDataset(local=source.out, batch_size=1)
    assert sorted(dataset[i]["caption"] for i in range(2)) == ["a blue square", "a red square"]  # first of each hash
    recaptions = {dataset[i]["caption"]: dataset[i]["recaption"] for i in range(2)}
    assert recaptions == {"a red square": "a square, red", "a blue square": ""}  # a caption column, "" where none


def test_dedup_across_sources_keeps_the_first_source(spark, tmp_path):
    red, blue = _jpeg("red"), _jpeg("blue")
    _img2dataset_output(tmp_path / "i2d" / "laion", [dict(key="0", caption="red", jpg=red, sha256="h0")])
    _img2dataset_output(
        tmp_path / "i2d" / "coyo",
        [dict(key="0", caption="red too", jpg=red, sha256="h0"), dict(key="1", caption="blue", jpg=blue, sha256="h1")],
    )
    sources = {name: SourceConfig(url_list="unused", out=str(tmp_path / name)) for name in ("laion", "coyo")}
    within = _convert(spark, tmp_path, sources)
    assert within["coyo"]["written"] == 2 and "duplicate_image" not in within["coyo"]
    across = _convert(spark, tmp_path, sources, dedup_across_sources=True)
    assert across["laion"]["written"] == 1
    assert across["coyo"]["written"] == 1 and across["coyo"]["duplicate_image"] == 1
    assert StreamingDataset(local=str(tmp_path / "coyo"), batch_size=1)[0]["caption"] == "blue"


def test_missing_download_rows_are_a_clear_error(spark, tmp_path):
    _img2dataset_output(tmp_path / "i2d" / "short", [dict(key="0", caption="red", jpg=_jpeg("red"), sha256="h0")])
    with pytest.raises(RuntimeError, match="1 rows for 8 URLs.*Run the same command again"):
        _convert(spark, tmp_path, {"short": SourceConfig(url_list="unused", out=str(tmp_path / "o"))}, sent=8)
