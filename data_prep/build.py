"""`make shards`: every source of a sources YAML -> URL dedup and filters -> img2dataset -> MDS stream.

    python -m data_prep.build yamls/data/sample.yaml [key=value ...]
    SPARK_MASTER=spark://host:7077 python -m data_prep.build yamls/data/merged2b.yaml

All of it runs on one Spark session (local[*] unless `spark.master` or SPARK_MASTER says otherwise).
Every URL list is found before Spark starts, and read and checked (columns, `where:`) before any
list is prepared or anything downloaded; a bad one ends the build with one line and exit code 2.
The terminal shows one line per stage and source; Spark's and img2dataset's output goes to
`<work_dir>/logs/`. Re-running the same command after a kill reuses the prepared URL lists and
img2dataset's finished shards, then converts again.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import TextIO

from data_prep import held, sample
from data_prep.download import download, finished_shards
from data_prep.sources import SourcesConfig, load_sources
from data_prep.spark import log_query_errors_to, spark_session
from data_prep.terminal import StageLine, log_folder, output_to, polling
from data_prep.to_mds import convert
from data_prep.url_lists import SourceError, check_url_list_exists, prepare_url_list, read_url_list
from pipeline.common.storage import StorageError, check_bucket, delete, write_json
from pipeline.common.tables import align_columns
from pipeline.config.loader import ConfigError


def check_before_spark(cfg: SourcesConfig) -> None:
    for name, source in cfg.sources.items():
        if source.held:
            held.check_source(name, source)
        else:
            check_url_list_exists(name, source)
        check_bucket(source.out)
    for path in cfg.decontaminate.eval_sets if cfg.decontaminate else []:
        if not os.path.isfile(os.path.join(path, "index.json")):
            raise SourceError(f"decontaminate.eval_sets: {path} is not an MDS stream (no index.json)")


def rows_folder(cfg: SourcesConfig, name: str) -> str:
    """Where a source's rows with their images are: img2dataset's output, or a held source's rows."""
    return os.path.join(cfg.work_dir, "img2dataset", name)


def read_held_source(spark, cfg: SourcesConfig, name: str, terminal: TextIO) -> dict:
    """A held source's input shards into rows (data_prep/held.py): {shards_done_before, shards_read}."""
    line = StageLine("read", name, terminal)
    stats = held.ingest(spark, name, cfg.sources[name], rows_folder(cfg, name), line.show)
    line.done(f"{stats['shards_read']} shards read now, {stats['shards_done_before']} before")
    return stats


def download_source(cfg: SourcesConfig, name: str, prepared: tuple, terminal: TextIO) -> tuple:
    """(img2dataset folder, {shards_done_before, shards_fetched}) of one source's prepared list."""
    list_dir, counts, reused = prepared
    source = cfg.sources[name]
    folder = rows_folder(cfg, name)
    if not reused:  # a new list: shards downloaded and scored for an older one no longer match
        delete(folder)
        delete(os.path.join(cfg.work_dir, "clip_scores", name))
    if not counts.get("to_download"):
        return folder, {}
    total = math.ceil(counts["to_download"] / source.img2dataset.number_sample_per_shard)
    line = StageLine("download", name, terminal)
    with polling(lambda: line.show(f"{len(finished_shards(folder))}/{total} shards")):
        fetched = download(source, list_dir, folder)
    line.done(f"{total}/{total} shards ({fetched['shards_fetched']} fetched now)")
    return folder, fetched


def score_downloads(spark, cfg: SourcesConfig, name: str, folder: str, terminal: TextIO, stats: dict):
    """The CLIP-score stage of one source (data_prep/clip_score.py): its scores, as a DataFrame."""
    from data_prep.clip_score import read_scores, score_source, scorer_id

    clip = cfg.sources[name].filters.clip_score
    scores_dir = os.path.join(cfg.work_dir, "clip_scores", name, scorer_id(clip))
    line = StageLine("score", name, terminal)
    stats.update(score_source(spark, name, clip, folder, scores_dir, line.show))
    scores = read_scores(spark, scores_dir, folder)
    line.done(f"{scores.count()} rows scored ({stats['shards_scored_before']} shards scored before)")
    return scores


def build(cfg: SourcesConfig) -> list:
    """Every source's MDS stream and summary. The terminal shows one line per stage and source;
    everything else printed meanwhile (Spark, img2dataset, streaming) goes to <logs>/build.log."""
    logs = log_folder(cfg.work_dir)
    serving = sample.serve(cfg) if cfg.sample is not None else contextlib.nullcontext()
    with output_to(os.path.join(logs, "build.log")) as terminal, serving:
        check_before_spark(cfg)
        with spark_session(cfg.spark, logs) as spark:
            log_query_errors_to(os.path.join(logs, "spark.log"))
            print(f"Building {len(cfg.sources)} sources on {spark.sparkContext.master} (logs: {logs}/)", file=terminal)
            fetched = {
                name: read_held_source(spark, cfg, name, terminal) for name in cfg.sources if cfg.sources[name].held
            }
            # Read once (its .json fields' schema is inferred by a scan): the list's filters, then the conversion.
            held_rows = {name: held.read_rows(spark, rows_folder(cfg, name)) for name in fetched}
            frames = {
                name: read_url_list(spark, name, source, held_rows[name].drop("jpg") if source.held else None)
                for name, source in cfg.sources.items()
            }
            lists = {}
            for name, source in cfg.sources.items():
                line = StageLine("prepare", name, terminal)
                line.show("reading the URL list")
                prepared = os.path.join(cfg.work_dir, "prepared", name)
                lists[name] = prepare_url_list(spark, name, source, prepared, frames[name])
                counts, reused = lists[name][1:]
                done = f"{counts.get('to_download', 0)} of {counts['urls']} rows to download"
                line.done(done + (" (prepared before)" if reused else ""))
            downloads, scores = {}, {}
            for name, prepared in lists.items():
                if cfg.sources[name].held:
                    folder = rows_folder(cfg, name)
                    if not prepared.reused:  # rows scored for other data or settings
                        delete(os.path.join(cfg.work_dir, "clip_scores", name))
                    downloads[name] = (held.kept_rows(spark, held_rows[name], prepared), prepared.counts)
                else:
                    folder, fetched[name] = download_source(cfg, name, prepared, terminal)
                    downloads[name] = (folder, prepared.counts)
                if cfg.sources[name].filters.clip_score is not None:
                    scores[name] = score_downloads(spark, cfg, name, folder, terminal, fetched[name])
            summaries = convert(spark, cfg, downloads, scores, terminal)
    if cfg.sample is not None:
        sample.write_eval_files(cfg)
    for summary in summaries:
        summary.update(fetched[summary["source"]])
    return summaries


# What the download and the scoring did this run, not reasons for a row.
STAGE_STATS = ("shards_done_before", "shards_fetched", "shards_read", "shards_scored_before", "shards_scored")


def format_table(summaries: list) -> str:
    counted = {k for s in summaries for k, v in s.items() if isinstance(v, int)}
    reasons = sorted(counted - {"urls", "written", *STAGE_STATS})
    stats = [k for k in STAGE_STATS if any(k in s for s in summaries)]
    header = ["source", "urls", "written", *reasons, *stats, "out"]
    rows = [[str(s.get(col, 0)) for col in header] for s in summaries]
    return align_columns([header, *rows])


def build_summary_path(work_dir: str, sources_yaml: str) -> str:
    """Where a build of `sources_yaml` leaves its table as JSON: one file per sources YAML, since
    builds share a work_dir (make demo's curation step reuses the sample's downloads)."""
    name = os.path.splitext(os.path.basename(sources_yaml))[0]
    return os.path.join(work_dir, "summaries", f"{name}.json")


def main(argv: list) -> None:
    if not argv:
        sys.exit(__doc__)
    try:
        cfg = load_sources(argv[0], argv[1:])
        summaries = build(cfg)
    except (ConfigError, SourceError, StorageError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
    write_json(build_summary_path(cfg.work_dir, argv[0]), summaries)
    print("\nShard build summary (every URL is written or counted under one reason):")
    print(format_table(summaries))


if __name__ == "__main__":
    main(sys.argv[1:])
