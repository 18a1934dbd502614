"""A whole `make shards` build of the sample's training sources, killed (kill -9) mid-download on
local Spark and mid-conversion on a Spark standalone cluster on loopback, then resumed on the cluster:
the same streams as the session's local build."""

import collections
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from streaming import StreamingDataset

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


SparkCluster = collections.namedtuple("SparkCluster", "master workers")


@pytest.fixture
def spark_cluster(tmp_path):
    """A Spark standalone master and two one-core workers on 127.0.0.1 (their URL and worker
    processes); every process stopped after."""
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
        yield SparkCluster(master, processes[1:])
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)
        assert all(p.poll() is not None for p in processes)


def _kill_when(cmd: list, ready, env=None, nodes=(), timeout: float = 600) -> None:
    """Start cmd in its own process group; once ready() is true, SIGKILL it and every process it
    started, here and under the cluster's worker processes `nodes` (executors and their Python
    workers), as machines dying would. Everything is stopped before anything is killed: Spark's
    Python workers put themselves in a process group of their own, and one left running would finish
    its shard against the sample's HTTP server, which died with the build, and record every URL as
    failed."""
    import psutil

    process = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, "the build ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGSTOP)
    roots = [psutil.Process(process.pid), *(psutil.Process(node.pid) for node in nodes)]
    stopped = {}
    while new := [p for root in roots for p in root.children(recursive=True) if p.pid not in stopped]:
        for child in new:  # until none is left running to start another
            with contextlib.suppress(psutil.NoSuchProcess):
                child.suspend()
            stopped[child.pid] = child
    os.killpg(process.pid, signal.SIGKILL)
    for child in stopped.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()
    psutil.wait_procs(list(stopped.values()), timeout=30)


@pytest.mark.slow
def test_killed_download_and_conversion_resume_to_the_same_streams(spark_cluster, sample_build, tmp_path):
    """Killed mid-download on local Spark, then mid-conversion on the cluster, then finished there by
    `make shards`: the cluster downloads the rest of the web source and all of the COCO-format source
    (every kind of bad row), and converts both, resuming a build another master started."""
    root = str(tmp_path / "resume")
    sources = _sample_yaml(tmp_path, ("web", "coco"))
    build = [sys.executable, "-m", "data_prep.build", sources]
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

    # On the cluster, killed as soon as the web stream's conversion starts writing (its folder appears).
    on_cluster = {**os.environ, "SPARK_MASTER": spark_cluster.master}
    _kill_when(
        [*build, *args], lambda: os.path.isdir(os.path.join(root, "web")), env=on_cluster, nodes=spark_cluster.workers
    )
    assert not os.path.exists(os.path.join(root, "web", "index.json"))  # a killed conversion: no stream
    print(f"killed during the conversion, after the download finished ({len(glob.glob(stats))} of 9 shards)")

    make = ["make", "-C", REPO, "shards", f"SOURCES={sources}", f"SHARDS_ARGS={' '.join(args)}"]
    proc = subprocess.run(make, env=on_cluster, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"on {spark_cluster.master}" in proc.stdout
    # The killed build ran on the cluster too: its workers launched executors for two applications.
    assert len({os.path.basename(app) for app in glob.glob(str(tmp_path / "worker*" / "app-*"))}) == 2
    web = _summaries(os.path.join(root, "_work"))["web"]
    assert web["shards_done_before"] == 9 and web["shards_fetched"] == 0  # the killed cluster run finished it
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
