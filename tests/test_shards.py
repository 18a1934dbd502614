"""`make shards` on Spark: URL-list checks before anything is downloaded, COCO captions. Whole builds on a
standalone cluster and killed mid-way: tests/test_shards_end_to_end.py."""

import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streaming import StreamingDataset

from data_prep.sources import ClipScoreConfig, SourceConfig
from data_prep.url_lists import SourceError, prepare_url_list
from tests.conftest import REPO


def _url_list(path, rows: list) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_where_caption_and_url_filters_run_before_download(spark, tmp_path):
    rows = [
        {"URL": "http://a/0", "TEXT": "a cat", "punsafe": 0.01, "LANGUAGE": "en"},
        {"URL": "http://a/1", "TEXT": "unsafe", "punsafe": 0.9, "LANGUAGE": "en"},
        {"URL": "http://a/2", "TEXT": "un chat", "punsafe": 0.01, "LANGUAGE": "fr"},
        {"URL": "http://a/3", "TEXT": " ", "punsafe": 0.01, "LANGUAGE": "en"},
        {"URL": "http://a/0", "TEXT": "a cat again", "punsafe": 0.01, "LANGUAGE": "en"},
        {"URL": "http://a/4", "TEXT": "no score", "punsafe": None, "LANGUAGE": "en"},
        {"URL": "http://a/1", "TEXT": "the same url, now safe", "punsafe": 0.0, "LANGUAGE": "en"},
    ]
    source = SourceConfig(
        url_list=_url_list(tmp_path / "laion.parquet", rows), url_col="URL", caption_col="TEXT", out="x"
    )
    source.filters.where = "punsafe < 0.1 AND LANGUAGE = 'en'"
    list_dir, counts, reused = prepare_url_list(spark, "laion", source, str(tmp_path / "prep"))
    assert not reused
    assert counts == {"urls": 7, "to_download": 2, "filtered_by_where": 3, "caption_too_short": 1, "duplicate_url": 1}
    kept = pq.read_table(list_dir).to_pylist()
    # file order kept; a URL whose first row was filtered is still downloaded once, from its kept row
    assert [(r["url"], r["caption"]) for r in kept] == [
        ("http://a/0", "a cat"),
        ("http://a/1", "the same url, now safe"),
    ]
    assert prepare_url_list(spark, "laion", source, str(tmp_path / "prep"))[2]  # same input: reused
    source.filters.min_image_size = 32  # a filter after the download: the list (and the download) stays
    source.filters.clip_score = ClipScoreConfig(model="ViT-B-32", min=0.28)
    assert prepare_url_list(spark, "laion", source, str(tmp_path / "prep"))[2]
    source.filters.min_caption_chars = 6
    assert not prepare_url_list(spark, "laion", source, str(tmp_path / "prep"))[2]  # settings changed


def _coco(path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_url_column", r"laion.parquet has no column 'URL'"),
        ("no_caption_column", r"laion.parquet has no column 'TEXT'"),
        ("unreadable_parquet", r"cannot read the URL list .*broken.parquet as parquet"),
        ("unknown_where_column", r"filters.where 'punsafe < 0.1'.*punsafe"),
        ("coco_without_annotations", r"captions.json is not a COCO captions file: it has no 'annotations' key"),
        ("coco_image_without_url", r"captions.json: images\[0\] has no 'coco_url'"),
    ],
)
def test_bad_url_lists_fail_before_download_naming_file_and_column(spark, tmp_path, case, match):
    source = SourceConfig(
        url_list=_url_list(tmp_path / "laion.parquet", [{"url": "http://a/0", "caption": "x"}]), out="x"
    )
    if case == "no_url_column":
        source.url_col = "URL"
    elif case == "no_caption_column":
        source.caption_col = "TEXT"
    elif case == "unreadable_parquet":
        (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
        source.url_list = str(tmp_path / "broken.parquet")
    elif case == "unknown_where_column":
        source.filters.where = "punsafe < 0.1"
    else:
        source.input_format = "coco_captions"
        image = {"id": 1} if case == "coco_image_without_url" else {"id": 1, "coco_url": "http://a/1"}
        data = {"images": [image]} if case == "coco_without_annotations" else {"images": [image], "annotations": []}
        source.url_list = _coco(tmp_path / "captions.json", data)
    with pytest.raises(SourceError, match=match):
        prepare_url_list(spark, "laion", source, str(tmp_path / "prep"))


def _two_sources_yaml(tmp_path, bad: dict) -> str:
    """A sources YAML: a good parquet source first, then `bad` (its keys over a good one's)."""
    from omegaconf import OmegaConf

    good = {"url_list": _url_list(tmp_path / "good.parquet", [{"url": "http://127.0.0.1:9/0", "caption": "x"}])}
    sources = {"good": {**good, "out": str(tmp_path / "good")}, "bad": {**good, "out": str(tmp_path / "bad"), **bad}}
    path = str(tmp_path / "sources.yaml")
    OmegaConf.save({"work_dir": str(tmp_path / "work"), "sources": sources}, path)
    return path


def test_a_missing_url_list_fails_in_one_line_before_spark_starts(tmp_path):
    path = _two_sources_yaml(tmp_path, {"url_list": str(tmp_path / "missing.parquet")})
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.build", path], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"SourceError: source 'bad': the URL list {tmp_path}/missing.parquet does not exist\n"
    assert not os.path.exists(tmp_path / "work" / "logs" / "spark.log")  # Spark never started


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"filters": {"where": "lang = 'en'"}}, r"filters.where \"lang = 'en'\": \[UNRESOLVED_COLUMN.*`lang`"),
        ({"caption_col": "TEXT"}, r"the URL list .*good.parquet has no column 'TEXT' \(its columns: url, caption\)"),
    ],
)
def test_every_list_is_checked_before_any_is_prepared(spark, tmp_path, capfd, bad, message):
    """The good source comes first, yet nothing is prepared: one line on stderr, exit code 2."""
    from data_prep.build import main

    with pytest.raises(SystemExit) as exit_info:
        main([_two_sources_yaml(tmp_path, bad)])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2
    assert re.fullmatch(rf"SourceError: source 'bad': {message}[^\n]*\n", err), err
    assert not os.path.exists(tmp_path / "work" / "prepared")
    assert "Traceback" not in out + err and "at org.apache" not in out + err


def test_coco_captions_keep_every_caption_and_the_sample_goes_through_it(sample_build):
    cfg, summaries = sample_build
    assert cfg.sources["coco"].input_format == "coco_captions"
    dataset = StreamingDataset(local=cfg.sources["coco"].out, batch_size=1)
    for i in range(0, dataset.num_samples, 97):
        sample = dataset[i]
        assert len(sample["captions"]) == 2 and sample["caption"] == sample["captions"][0]


def test_noisy_captions_pass_on_exactly_their_share_deterministically_and_are_recorded(spark, tmp_path):
    from data_prep.sources import NoisyCaptionsConfig

    rows = [{"url": f"http://a/{i}", "caption": f"caption {i}", "recaption": f"re {i}"} for i in range(40)]
    rows.append({"url": "http://a/0", "caption": "a duplicate url, dropped before the noise", "recaption": "-"})
    url_list = _url_list(tmp_path / "list.parquet", rows)
    chosen = {}
    for run, seed in enumerate((0, 0, 1)):
        source = SourceConfig(
            url_list=url_list, caption_columns=["recaption"], noisy_captions=NoisyCaptionsConfig(share=0.3, seed=seed)
        )
        source.out = "x"
        list_dir, counts, _ = prepare_url_list(spark, "web", source, str(tmp_path / f"prep{run}"))
        kept = pq.read_table(list_dir).to_pylist()
        assert counts["to_download"] == len(kept) == 40
        swapped = [r for r in kept if r["caption_swapped"]]
        assert len(swapped) == 12  # exactly 30% of the rows written to the list
        assert all(r["original_caption"] == f"caption {r['url'].split('/')[-1]}" for r in kept)
        assert all(r["caption"] != r["original_caption"] for r in swapped)  # each takes another's caption
        assert sorted(r["caption"] for r in swapped) == sorted(r["original_caption"] for r in swapped)  # passed on
        assert all(r["recaption"] == "re " + r["caption"].split()[-1] for r in kept)  # every caption column moves along
        assert all(r["caption"] == r["original_caption"] for r in kept if not r["caption_swapped"])
        chosen[run] = {r["url"]: r["caption"] for r in swapped}
    assert chosen[0] == chosen[1] and set(chosen[0]) != set(chosen[2])  # a function of the seed


def test_noisy_captions_move_a_coco_image_s_captions_together(spark, tmp_path):
    from data_prep.sample import coco_captions_json
    from data_prep.sources import NoisyCaptionsConfig

    captions = [[f"first {i}", f"second {i}"] for i in range(10)]
    rows = [{"url": f"http://a/{i}", "caption": "", "captions": c, "label": i} for i, c in enumerate(captions)]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco_captions_json(rows)))
    source = SourceConfig(
        url_list=str(path), input_format="coco_captions", noisy_captions=NoisyCaptionsConfig(share=0.4, seed=0)
    )
    source.out = "x"
    list_dir, counts, _ = prepare_url_list(spark, "coco", source, str(tmp_path / "prep"))
    kept = pq.read_table(list_dir).to_pylist()
    swapped = [r for r in kept if r["caption_swapped"]]
    assert counts["to_download"] == len(kept) == 10 and len(swapped) == 4
    for row in kept:  # an image's captions stay together: the first is `caption`, passed on with it
        number = row["caption"].split()[-1]
        assert json.loads(row["captions"]) == [f"first {number}", f"second {number}"]
        assert (row["caption"] != row["original_caption"]) == bool(row["caption_swapped"])
