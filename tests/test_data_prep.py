import glob
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streaming import StreamingDataset

from data_prep.sources import SourceConfig
from data_prep.to_mds import BASE_COLUMNS, to_mds

DROP_REASONS = ["failed_to_download", "failed_to_resize", "caption_too_short", "duplicate_url", "duplicate_image",
                "image_too_small", "undecodable"]  # fmt: skip


def test_img2dataset_downloaded_from_loopback(sample_build):
    cfg, _ = sample_build
    shards = glob.glob(os.path.join(cfg.work_dir, "img2dataset", "web", "*.parquet"))
    rows = pq.read_table(shards[0], columns=["url", "status"]).to_pylist()
    assert all(row["url"].startswith("http://127.0.0.1:") for row in rows)
    assert sum(row["status"] == "success" for row in rows) > 0.9 * len(rows)


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


def test_heldout_splits_are_disjoint_from_training(sample_build):
    cfg, summaries = sample_build
    train = StreamingDataset(local=cfg.sources["web"].out, batch_size=1)
    test = StreamingDataset(local=cfg.sources["web_test"].out, batch_size=1)
    train_captions = {train[i]["caption"] for i in range(train.num_samples)}
    test_captions = {test[i]["caption"] for i in range(test.num_samples)}
    assert summaries["web_test"]["written"] > 300
    assert not (train_captions & test_captions)


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


def test_to_mds_filters_and_counts(tmp_path):
    """Rows img2dataset marked success can still be tiny, truncated or duplicated."""
    good, other = _jpeg("red"), _jpeg("blue")
    rows = [
        dict(key="0", url="u0", caption="a red square", jpg=good, sha256="h0"),
        dict(key="1", url="u1", caption="a blue square", jpg=other, sha256="h1"),
        dict(key="2", url="u2", caption="the same red square", jpg=good, sha256="h0"),
        dict(key="3", url="u0", caption="a red square again", jpg=good, sha256="h3"),
        dict(key="4", url="u4", caption="truncated", jpg=good[: len(good) // 2], sha256="h4"),
        dict(key="5", url="u5", caption="", jpg=other, sha256="h5"),
        dict(key="6", url="u6", caption="tiny", jpg=_jpeg("green"), sha256="h6", width=4, height=4),
        dict(key="7", url="u7", caption="gone", jpg=None, sha256=None, status="failed_to_download"),
    ]
    rows = [{"status": "success", "width": 40, "height": 30, **row} for row in rows]
    folder = tmp_path / "i2d"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "00000.parquet")
    source = SourceConfig(url_list="unused", out=str(tmp_path / "mds"))
    source.filters.min_image_size = 16
    summary = to_mds("unit", source, str(folder))
    assert summary["written"] == 2
    assert summary["duplicate_image"] == 1 and summary["duplicate_url"] == 1
    assert summary["undecodable"] == 1 and summary["caption_too_short"] == 1
    assert summary["image_too_small"] == 1 and summary["failed_to_download"] == 1
    dataset = StreamingDataset(local=source.out, batch_size=1)
    assert [dataset[i]["caption"] for i in range(2)] == ["a red square", "a blue square"]


def test_to_mds_without_download_output_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no img2dataset parquet output"):
        to_mds("nothing", SourceConfig(url_list="x", out=str(tmp_path / "o")), str(tmp_path))
