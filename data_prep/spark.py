"""The Spark session `make shards` runs on: local[*] by default, a cluster when asked."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from data_prep.sources import SparkConfig

# Object-storage settings the executors need too (streaming's MDSWriter and img2dataset write there).
STORAGE_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


def master_url(cfg: SparkConfig) -> str:
    return os.environ.get("SPARK_MASTER") or cfg.master


@contextlib.contextmanager
def spark_session(cfg: SparkConfig) -> Iterator[pyspark.sql.SparkSession]:  # noqa: F821
    """A SparkSession whose Python workers run this interpreter (they import streaming and PIL).
    An already active session (a notebook's, a test's) is used as it is and left running."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    master = master_url(cfg)
    builder = (
        SparkSession.builder.master(master)
        .appName("clipstream-shards")
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
        .config("spark.ui.showConsoleProgress", "false")
        # Arrow moves pandas batches to mapInPandas; big JPEG columns want smaller batches.
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "2000")
    )
    if master.startswith("local") or "127.0.0.1" in master or "localhost" in master:
        builder = builder.config("spark.driver.host", "127.0.0.1")  # no hostname lookup on a laptop
    for name in STORAGE_ENV:
        if name in os.environ:
            builder = builder.config(f"spark.executorEnv.{name}", os.environ[name])
    builder = builder.config("spark.executorEnv.NO_ALBUMENTATIONS_UPDATE", "1")
    if os.environ.get("S3_ENDPOINT_URL"):  # the same S3-compatible store for s3a:// URL lists
        builder = builder.config("spark.hadoop.fs.s3a.endpoint", os.environ["S3_ENDPOINT_URL"])
        builder = builder.config("spark.hadoop.fs.s3a.path.style.access", "true")
    for key, value in cfg.conf.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()
