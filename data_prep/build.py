"""`make shards`: every source of a sources YAML -> URL dedup and filters -> img2dataset -> MDS stream.

    python -m data_prep.build yamls/data/sample.yaml [key=value ...]
    SPARK_MASTER=spark://host:7077 python -m data_prep.build yamls/data/merged2b.yaml

All of it runs on one Spark session (local[*] unless `spark.master` or SPARK_MASTER says otherwise).
Every URL list is read and checked before anything is downloaded. Re-running the same command
after a kill reuses the prepared URL lists and img2dataset's finished shards, then converts again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from data_prep import sample
from data_prep.download import download
from data_prep.sources import SourcesConfig, load_sources
from data_prep.spark import spark_session
from data_prep.storage import check_bucket, remove_tree
from data_prep.to_mds import convert
from data_prep.url_lists import prepare_url_list
from pipeline.tables import align_columns


def build(cfg: SourcesConfig) -> list:
    serving = sample.serve(cfg) if cfg.sample is not None else contextlib.nullcontext()
    with serving, spark_session(cfg.spark) as spark:
        print(f"Building {len(cfg.sources)} sources on {spark.sparkContext.master}", flush=True)
        for source in cfg.sources.values():
            check_bucket(source.out)  # before any download
        start = time.time()
        lists = {
            name: prepare_url_list(spark, name, source, os.path.join(cfg.work_dir, "prepared", name))
            for name, source in cfg.sources.items()
        }
        print(f"URL lists checked and deduplicated in {time.time() - start:.1f} s", flush=True)
        downloads, fetched = {}, {}
        for name, (list_dir, counts, reused) in lists.items():
            folder = os.path.join(cfg.work_dir, "img2dataset", name)
            if not reused:
                remove_tree(folder)  # a new list: shards downloaded for an older one no longer match
            fetched[name] = download(cfg.sources[name], list_dir, folder) if counts.get("to_download") else {}
            downloads[name] = (folder, counts)
        start = time.time()
        summaries = convert(spark, cfg, downloads)
        print(f"MDS streams written in {time.time() - start:.1f} s", flush=True)
    if cfg.sample is not None:
        sample.write_eval_files(cfg)
    for summary in summaries:
        summary.update(fetched[summary["source"]])
    return summaries


DOWNLOAD_STATS = ("shards_done_before", "shards_fetched")


def format_table(summaries: list) -> str:
    reasons = sorted({k for s in summaries for k in s} - {"source", "out", "urls", "written", *DOWNLOAD_STATS})
    header = ["source", "urls", "written", *reasons, *DOWNLOAD_STATS, "out"]
    rows = [[str(s.get(col, 0)) for col in header] for s in summaries]
    return align_columns([header, *rows])


def main(argv: list) -> None:
    if not argv:
        sys.exit(__doc__)
    cfg = load_sources(argv[0], argv[1:])
    summaries = build(cfg)
    os.makedirs(cfg.work_dir, exist_ok=True)
    with open(os.path.join(cfg.work_dir, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    print("\nShard build summary (every URL is written or counted under one reason):")
    print(format_table(summaries))


if __name__ == "__main__":
    main(sys.argv[1:])
