"""The Spark session `make shards` runs on: local[*] by default, a cluster when asked.

Everything the JVM and its Python workers print (Spark's log, Java stacks, img2dataset's output in
the executors) goes to `<log_dir>/spark.log`; the build prints its own progress and one-line errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from data_prep.sources import SparkConfig
from data_prep.terminal import output_to

# Object-storage settings the executors need too (streaming's MDSWriter and img2dataset write there).
STORAGE_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


def master_url(cfg: SparkConfig) -> str:
    return os.environ.get("SPARK_MASTER") or cfg.master


# PySpark's driver-side loggers of query errors: each logs the whole Java stack as one JSON line.
QUERY_ERROR_LOGGERS = ("SQLQueryContextLogger", "DataFrameQueryContextLogger")


def log_query_errors_to(path: str) -> None:
    """Sends PySpark's query-error log lines to `path`: the build reports the error in one line."""
    from pyspark.logger import PySparkLogger

    for name in QUERY_ERROR_LOGGERS:
        logger = PySparkLogger.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(logging.FileHandler(path))


@contextlib.contextmanager
def spark_session(cfg: SparkConfig, log_dir: str) -> Iterator[pyspark.sql.SparkSession]:  # noqa: F821
    """A SparkSession whose Python workers run this interpreter (they import streaming and PIL),
    its output in `log_dir`. An already active session (a notebook's, a test's) is used as it is
    and left running."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    master = master_url(cfg)
    loopback = master.startswith("local") or "127.0.0.1" in master or "localhost" in master
    if loopback:  # else Spark looks the hostname up, and may pick (and warn about) another address
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (
        SparkSession.builder.master(master)
        .appName("clipstream-shards")
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
        .config("spark.ui.showConsoleProgress", "false")
        # Arrow moves pandas batches to mapInPandas; big JPEG columns want smaller batches.
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "2000")
    )
    if loopback:
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    for name in STORAGE_ENV:
        if name in os.environ:
            builder = builder.config(f"spark.executorEnv.{name}", os.environ[name])
    builder = builder.config("spark.executorEnv.NO_ALBUMENTATIONS_UPDATE", "1")
    if os.environ.get("S3_ENDPOINT_URL"):  # the same S3-compatible store for s3a:// URL lists
        builder = builder.config("spark.hadoop.fs.s3a.endpoint", os.environ["S3_ENDPOINT_URL"])
        builder = builder.config("spark.hadoop.fs.s3a.path.style.access", "true")
    for key, value in cfg.conf.items():
        builder = builder.config(key, str(value))
    with output_to(os.path.join(log_dir, "spark.log")):  # the JVM keeps the output it starts with
        spark = builder.getOrCreate()
    try:
        yield spark
    finally:
        spark.stop()
