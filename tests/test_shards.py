"""`make shards` on Spark: URL-list checks, a standalone cluster on loopback, and kill -9 resumption."""

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streaming import StreamingDataset

from data_prep.sources import ClipScoreConfig, SourceConfig
from data_prep.url_lists import SourceError, prepare_url_list
from tests.conftest import REPO, SAMPLE_YAML, sample_overrides
from tests.s3server import free_ports

SPARK_HOME = os.path.join(os.path.dirname(__import__("pyspark").__file__))


def _sample_yaml(tmp_path, names: tuple) -> str:
    """The sample's sources YAML with only `names` (the end-to-end tests need the training sources)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(SAMPLE_YAML)
    cfg.sources = {name: cfg.sources[name] for name in names}
    path = str(tmp_path / "sources.yaml")
    OmegaConf.save(cfg, path)
    return path


def _training_sources_only(overrides: list) -> list:
    return [o for o in overrides if not (o.startswith("sources.") and "_test." in o)]


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


def _samples(out: str) -> set:
    """(URL path without the server's port, image sha1) of every sample of a stream."""
    import hashlib

    dataset = StreamingDataset(local=out, batch_size=1)
    return {
        (dataset[i]["url"].split("/", 3)[3], hashlib.sha1(dataset[i]["image"]).hexdigest())
        for i in range(dataset.num_samples)
    }


def _summaries(work_dir: str) -> dict:
    """The build summary of _sample_yaml's sources.yaml."""
    with open(os.path.join(work_dir, "summaries", "sources.json")) as f:
        return {s["source"]: s for s in json.load(f)}


REASONS = (
    "urls",
    "written",
    "failed_to_download",
    "failed_to_resize",
    "caption_too_short",
    "duplicate_url",
    "duplicate_image",
)


def _same_result(root: str, sample_build, names=("web", "coco")) -> None:
    cfg, expected = sample_build
    found = _summaries(os.path.join(root, "_work"))
    for name in names:
        assert {r: found[name].get(r, 0) for r in REASONS} == {r: expected[name].get(r, 0) for r in REASONS}
        assert _samples(os.path.join(root, name)) == _samples(cfg.sources[name].out)


@pytest.fixture
def spark_cluster(tmp_path):
    """A Spark standalone master and two one-core workers on 127.0.0.1; every process stopped after."""
    master_port, ui_port, w1, w2 = free_ports(4)
    spark_class = os.path.join(SPARK_HOME, "bin", "spark-class")
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(tmp_path),
        "PYSPARK_PYTHON": sys.executable,
    }
    processes = [
        subprocess.Popen(
            [
                spark_class,
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                str(master_port),
                "--webui-port",
                str(ui_port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    ]
    master = f"spark://127.0.0.1:{master_port}"
    for port in (w1, w2):
        processes.append(
            subprocess.Popen(
                [
                    spark_class,
                    "org.apache.spark.deploy.worker.Worker",
                    master,
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    "1",
                    "--memory",
                    "1g",
                    "--webui-port",
                    str(port),
                    "--work-dir",
                    str(tmp_path / f"worker{port}"),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        yield master
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
        assert all(p.poll() is not None for p in processes)


@pytest.mark.slow
def test_make_shards_on_a_standalone_cluster(spark_cluster, sample_build, tmp_path):
    """The COCO-format source (every kind of bad row, 620 URLs) built on the cluster as it is locally."""
    root = str(tmp_path / "cluster")
    args = " ".join(o for o in sample_overrides(root) if not o.startswith("sources.") or "sources.coco." in o)
    proc = subprocess.run(
        ["make", "-C", REPO, "shards", f"SOURCES={_sample_yaml(tmp_path, ('coco',))}", f"SHARDS_ARGS={args}"],
        env={**os.environ, "SPARK_MASTER": spark_cluster},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"on {spark_cluster}" in proc.stdout
    _same_result(root, sample_build, ("coco",))


def _kill_when(cmd: list, ready, timeout: float = 600) -> None:
    """Start cmd in its own process group; once ready() is true, SIGKILL the group and every process
    it started, as a machine dying would. (Spark's Python workers put themselves in a process group
    of their own: killed with the group only, they would finish their shards against the sample's
    HTTP server, which died with the build, and record every URL as failed.)"""
    import psutil

    process = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, "the build ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    descendants = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()
    psutil.wait_procs(descendants, timeout=30)


@pytest.mark.slow
def test_killed_download_and_conversion_resume_to_the_same_streams(sample_build, tmp_path):
    root = str(tmp_path / "resume")
    build = [sys.executable, "-m", "data_prep.build", _sample_yaml(tmp_path, ("web", "coco"))]
    args = [
        *_training_sources_only(sample_overrides(root)),
        "sources.web.img2dataset.number_sample_per_shard=400",
        "sources.web.img2dataset.thread_count=2",
    ]
    stats = os.path.join(root, "_work", "img2dataset", "web", "*_stats.json")
    _kill_when([*build, *args], lambda: len(glob.glob(stats)) >= 2)
    done = len(glob.glob(stats))
    assert 2 <= done < 9  # about 3,300 URLs to download, 400 a shard: killed mid-download
    print(f"killed with {done} of 9 download shards finished (about {done * 400} URLs)")

    # Killed as soon as the web stream's conversion starts writing (its folder appears).
    _kill_when([*build, *args], lambda: os.path.isdir(os.path.join(root, "web")))
    assert not os.path.exists(os.path.join(root, "web", "index.json"))  # a killed conversion: no stream
    print(f"killed during the conversion, after the download finished ({len(glob.glob(stats))} of 9 shards)")

    proc = subprocess.run([*build, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    web = _summaries(os.path.join(root, "_work"))["web"]
    assert web["shards_done_before"] == 9 and web["shards_fetched"] == 0  # the second run finished the download
    # The terminal: a line per stage and source; Spark's, img2dataset's and streaming's output is in the logs.
    lines = proc.stdout.splitlines()
    with open(os.path.join(root, "_work", "prepared", "web", "counts.json")) as f:
        counts = json.load(f)
    assert f"prepare  web: {counts['to_download']} of {counts['urls']} rows to download (prepared before)" in lines
    assert "download web: 9/9 shards (0 fetched now)" in lines
    coco = _summaries(os.path.join(root, "_work"))["coco"]
    assert f"write    coco: {coco['written']} rows written to {coco['out']}" in lines
    assert proc.stderr == ""
    assert "dataframe_to_mds" in open(os.path.join(root, "_work", "logs", "build.log")).read()
    _same_result(root, sample_build)
