import contextlib
import os
import subprocess
import sys

import pytest

from data_prep.build import build
from data_prep.sources import load_sources
from pipeline import compat
from pipeline.common.storage import read_json, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_YAML = os.path.join(REPO, "yamls", "data", "sample.yaml")
DEMO_YAML = os.path.join(REPO, "yamls", "demo_cpu.yaml")
SMALL_SAMPLE = ["sample.fashion_train=600", "sample.fashion_test=200"]
compat.apply()  # as the entry points do; the test workers build StreamingDatasets side by side


def sample_overrides(root: str) -> list:
    """The built-in sample, smaller, written under `root` instead of data/, served on a free port."""
    from tests.s3server import free_ports

    cfg = load_sources(SAMPLE_YAML)
    outs = [f"sources.{name}.out={root}/{name}" for name in cfg.sources]
    return [f"work_dir={root}/_work", f"sample.port={free_ports(1)[0]}", *SMALL_SAMPLE, *outs]


@pytest.fixture(scope="session")
def spark(s3_server, tmp_path_factory):
    """One local Spark session for the test run; `make shards` code uses it when it is active.
    Its Python workers get the test S3 server's endpoint and keys (as a cluster's executors would)."""
    from data_prep.sources import SparkConfig
    from data_prep.spark import spark_session

    conf = {"spark.sql.shuffle.partitions": "4", **{f"spark.executorEnv.{k}": v for k, v in s3_server.env().items()}}
    with spark_session(
        SparkConfig(master="local[2]", conf=conf), str(tmp_path_factory.mktemp("spark_logs"))
    ) as session:
        yield session


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory, request):
    """(config, summaries) of a real sample build: loopback HTTP -> img2dataset -> MDS. Built once
    per test run: under pytest-xdist the first worker to need it builds it, the others wait and read
    it (they start no Spark for it)."""
    from filelock import FileLock

    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    built = shared / "sample_build.json"
    with FileLock(str(shared / "sample_build.lock")):
        if not built.exists():
            request.getfixturevalue("spark")  # the build uses the active session
            overrides = sample_overrides(str(shared / "sample"))
            summaries = build(load_sources(SAMPLE_YAML, overrides))
            write_json(str(built), {"overrides": overrides, "summaries": summaries})
    recorded = read_json(str(built))
    cfg = load_sources(SAMPLE_YAML, recorded["overrides"])
    return cfg, {s["source"]: s for s in recorded["summaries"]}


def demo_model():
    """The demo recipe's model (what a fresh-model eval needs: eval YAMLs take it from the run)."""
    from pipeline.config.schema import TrainConfig, load

    return load(TrainConfig, DEMO_YAML).model


EVAL_YAML = os.path.join(REPO, "yamls", "eval", "zeroshot.yaml")


def eval_overrides(sample_cfg) -> list:
    """yamls/eval/zeroshot.yaml on the test build of the sample."""
    coco_test = sample_cfg.sources["coco_test"].out
    return [
        f"datasets.fashion_mnist.local={coco_test}",
        f"datasets.fashion_mnist.classnames={coco_test}/classnames.txt",
        f"datasets.fashion_mnist.templates={coco_test}/zeroshot_classification_templates.txt",
        f"datasets.emoji.local={sample_cfg.sources['web_test'].out}",
        "num_workers=0",
        "load_path=null",
    ]


def fresh_eval_config(sample_cfg):
    """The eval YAML on the test sample, for a fresh demo model (no run to read the model from)."""
    from dataclasses import replace

    from pipeline.config.schema import EvalConfig, load

    return replace(load(EvalConfig, EVAL_YAML, eval_overrides(sample_cfg)), model=demo_model())


@pytest.fixture(scope="session")
def trained(sample_build, tmp_path_factory):
    """Two demo batches with both eval sets as Composer evaluators, evaluated and saved at batch 2:
    (eval config, checkpoint, the evaluators' logged scores)."""
    from composer.loggers import InMemoryLogger

    from pipeline.config.schema import TrainConfig, load
    from pipeline.train import build_trainer

    cfg, _ = sample_build
    run_dir = tmp_path_factory.mktemp("run")
    eval_cfg = fresh_eval_config(cfg)
    train_cfg = load(
        TrainConfig,
        DEMO_YAML,
        train_overrides(
            cfg,
            run_dir,
            "data.global_batch_size=32",
            "scheduler.warmup=0ba",
            "max_duration=2ba",
            "eval_interval=2ba",
            "checkpoint.save_interval=2ba",
        ),
    )
    train_cfg.eval_datasets = eval_cfg.datasets
    logger = InMemoryLogger()
    trainer = build_trainer(train_cfg, loggers=[logger])  # as train.py builds it
    trainer.fit()
    trainer.close()
    logged = {k: float(v[-1][1]) for k, v in logger.data.items() if k.startswith("metrics/")}
    return eval_cfg, str(run_dir / "checkpoints" / "latest-rank0.pt"), logged


# A small model keeps each checkpoint (weights + Adam state) a few MB.
SMALL_MODEL = [
    "model.custom.embed_dim=32",
    "model.custom.vision_cfg.width=32",
    "model.custom.vision_cfg.layers=2",
    "model.custom.text_cfg.width=32",
    "model.custom.text_cfg.heads=2",
    "model.custom.text_cfg.layers=2",
]


def train_overrides(cfg, run_dir: str, *extra: str) -> list:
    """Demo recipe on the test shards, small and quick."""
    return [
        f"run_dir={run_dir}",
        f"data.streams.web.local={cfg.sources['web'].out}",
        f"data.streams.coco.local={cfg.sources['coco'].out}",
        "data.num_workers=0",
        "progress_bar=false",
        *extra,
    ]


def run_train(launcher: list, overrides: list, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*launcher, os.path.join(REPO, "pipeline", "train.py"), DEMO_YAML, *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_here(overrides: list) -> None:
    """pipeline/train.py's main in this test process, as `python pipeline/train.py` runs it, for the
    uninterrupted runs a test compares against: a new process would import torch and Composer again
    (about 10 s of a core). Runs a test kills, or whose exit code and output it checks, stay processes."""
    import torch

    import pipeline.train

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        pipeline.train.main([DEMO_YAML, *overrides])
    finally:
        torch.use_deterministic_algorithms(deterministic)  # `deterministic=true` sets it for the process
        if torch.distributed.is_initialized():  # FSDP on one rank makes a process group of one
            torch.distributed.destroy_process_group()


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    """Two model state dicts (a whole model: more than 10 tensors) with the same keys, equal bit for bit."""
    import torch

    assert actual.keys() == expected.keys() and len(expected) > 10
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


PYTHON = [sys.executable]
COMPOSER = [os.path.join(os.path.dirname(sys.executable), "composer")]


def run_check_script(script: str, ranks: int, out, *args: str) -> dict:
    """tests/<script> under `composer -n <ranks>`; what it saved to `out` (tensors and plain data)."""
    import torch

    proc = subprocess.run(
        [*COMPOSER, "-n", str(ranks), os.path.join(REPO, "tests", script), str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the whole session; see tests/s3server.py."""
    from tests.s3server import S3Server

    with S3Server(str(tmp_path_factory.mktemp("s3"))) as server:
        yield server


@contextlib.contextmanager
def s3_environment(s3_server):
    """The server's endpoint and keys in os.environ meanwhile: for module-scoped fixtures, which
    cannot use the `s3` fixture's monkeypatch."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env().items():
            patch.setenv(key, value)
        yield


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server, running, with its endpoint and keys in os.environ for this test."""
    if not s3_server.running:  # a fault test may have left it stopped
        s3_server.start()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3.make_bucket()


# `make test` runs pytest-xdist with --dist loadgroup: each group below runs whole on one worker, so
# a module's fixtures run once and one Spark session serves every test that uses Spark. The slowest
# groups go first (as `--durations` measured them) so the two workers end together; the
# sample-free accumulation checks run while the other worker builds the sample.
SLOWEST_FIRST = [
    "spark",
    "test_accumulation",
    "test_elastic",
    "test_shards_end_to_end",
    "test_resume",
    "test_parallel",
    "test_sweep",
    "test_multinode",
    "test_weights",
    "test_record",
    "test_train",
    "test_loss",
    "test_eval",
]


# tryfirst: xdist names each test's group from these marks in its own hook, which would otherwise run
# first (the conftest is registered before xdist's worker plugin) and find none: no group, split modules.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    spark_modules = {item.module.__name__ for item in items if "spark" in item.fixturenames}

    def group(item) -> str:
        module = item.module.__name__
        return "spark" if module in spark_modules else module.rsplit(".", 1)[-1]

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: the others keep their order
