"""`make shards`' conversion at growing sizes: Spark (filter + dedup + dataframe_to_mds) against the
single-process converter it replaced, side by side on the same synthetic img2dataset output.

    python bench/shards.py                       # 10k, 100k and 1M rows
    python bench/shards.py --rows 10000 100000
    python bench/shards.py --engines score --rows 100000 300000 1000000   # the CLIP-score stage
    python bench/shards.py --engines spark webdataset --rows 100000 1000000   # data already held

`--engines webdataset` builds the same rows held as img2dataset's webdataset output (a tar of
.jpg/.txt/.json per shard, with its parquet beside it) by a whole `make shards` of a held source
(data_prep/held.py: read the tars, the URL-list filters, then the conversion); `spark` is what a
URL-list source costs once its images are downloaded (a re-run reuses the prepared list and the
downloads, so only the conversion runs).

The input is what img2dataset leaves: parquet shards of 10,000 rows with a `_stats.json` each,
small JPEGs (every one distinct: a shared flat-colour JPEG, 32x32 by default, with a unique tail
after its end marker), 5% failed downloads, 3% exact duplicate images, 2% images below the size
filter. `--engines score` times the CLIP-score stage (data_prep/clip_score.py) on the same input
with a tiny fresh CLIP (the demo recipe's, exported in open_clip's hub layout), 64 pairs a batch.
Each run is a fresh subprocess; peak RSS is sampled every 0.2 s for the driver (the Python
process that runs the conversion), the Spark JVM and the Spark Python workers (largest sum seen).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The single-process converter before the Spark one (git history), run on the same input.
OLD_CONVERTER_COMMIT = "46ae1f5"
SHARD_ROWS = 10_000


def make_input(folder: str, rows: int, image_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (200, 80, 40)).save(buffer, format="JPEG", quality=90)
    base = buffer.getvalue()
    os.makedirs(folder, exist_ok=True)
    for shard in range(0, rows, SHARD_ROWS):
        batch = []
        for i in range(shard, min(rows, shard + SHARD_ROWS)):
            row = {
                "key": f"{i:09d}",
                "url": f"http://example.com/{i}.jpg",
                "caption": f"image number {i}",
                "status": "success",
                "width": image_size,
                "height": image_size,
                "jpg": base + i.to_bytes(8, "big"),
            }
            if i % 20 == 7:
                row.update(status="failed_to_download", jpg=None, width=None, height=None)
            elif i % 100 in (11, 12, 13):
                row["jpg"] = base + (i - 1).to_bytes(8, "big")  # the same bytes as the row before
            elif i % 50 == 17:
                row.update(width=8, height=8)  # below the size filter (16)
            row["sha256"] = hashlib.sha256(row["jpg"]).hexdigest() if row["jpg"] else None
            batch.append(row)
        name = os.path.join(folder, f"{shard // SHARD_ROWS:05d}")
        pq.write_table(pa.Table.from_pylist(batch), name + ".parquet")
        with open(name + "_stats.json", "w") as f:
            json.dump({"count": len(batch)}, f)


def make_tars(folder: str) -> str:
    """img2dataset's webdataset output of the same rows: per shard a tar of the downloaded rows and
    the parquet of every row (failures included) beside it."""
    import tarfile

    import pyarrow.parquet as pq

    tars = folder + "_tars"
    os.makedirs(tars, exist_ok=True)
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".parquet")):
        table = pq.read_table(os.path.join(folder, name))
        pq.write_table(table.drop(["jpg"]), os.path.join(tars, name))
        with tarfile.open(os.path.join(tars, name.replace(".parquet", ".tar")), "w") as tar:
            for row in table.to_pylist():
                if row["status"] != "success":
                    continue
                meta = json.dumps({k: v for k, v in row.items() if k != "jpg"}).encode()
                for extension, data in (("jpg", row["jpg"]), ("txt", row["caption"].encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{row['key']}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return tars


def run_webdataset(tars: str, out: str, cores: int) -> dict:
    from data_prep.build import build
    from data_prep.sources import SourceConfig, SourcesConfig, SparkConfig

    source = SourceConfig(path=tars, input_format="webdataset", out=out)
    source.filters.min_image_size = 16
    cfg = SourcesConfig(
        work_dir=out + "_work",
        sources={"bench": source},
        spark=SparkConfig(master=f"local[{cores}]", driver_memory="1g"),
    )
    start = time.time()
    (summary,) = build(cfg)
    return {"seconds": time.time() - start, "written": summary["written"]}


def run_spark(folder: str, out: str, rows: int, cores: int) -> dict:
    from data_prep.sources import SourceConfig, SourcesConfig, SparkConfig
    from data_prep.spark import spark_session
    from data_prep.to_mds import convert

    source = SourceConfig(url_list="unused", out=out)
    source.filters.min_image_size = 16
    cfg = SourcesConfig(
        work_dir=out + "_work",
        sources={"bench": source},
        spark=SparkConfig(master=f"local[{cores}]", driver_memory="1g"),
    )
    start = time.time()  # the Spark session's start counted, as in a whole build
    with spark_session(cfg.spark, os.path.join(cfg.work_dir, "logs")) as spark:
        (summary,) = convert(spark, cfg, {"bench": (folder, {"urls": rows, "to_download": rows})})
        return {"seconds": time.time() - start, "written": summary["written"]}


def run_spark_score(folder: str, out: str, cores: int, model: str) -> dict:
    from data_prep.clip_score import read_scores, score_source
    from data_prep.sources import ClipScoreConfig, SparkConfig
    from data_prep.spark import spark_session

    with spark_session(SparkConfig(master=f"local[{cores}]", driver_memory="1g"), out + "_logs") as spark:
        start = time.time()
        score_source(spark, "bench", ClipScoreConfig(model=model), folder, out, show=lambda text: None)
        seconds = time.time() - start
        return {"seconds": seconds, "written": read_scores(spark, out, folder).count()}


def export_tiny_clip(folder: str) -> str:
    """The demo recipe's CLIP, freshly initialised, in open_clip's hub layout: `local-dir:` names it."""
    from pipeline.config.schema import TrainConfig, load
    from pipeline.model.clip import build_clip
    from pipeline.model.export import export

    model = load(TrainConfig, os.path.join(REPO, "yamls", "demo_cpu.yaml")).model
    export(build_clip(model)[0], model, folder)
    return f"local-dir:{folder}"


def run_single_process(folder: str, out: str) -> dict:
    import types

    code = subprocess.run(
        ["git", "show", f"{OLD_CONVERTER_COMMIT}:data_prep/to_mds.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    old = types.ModuleType("old_to_mds")
    exec(compile(code, "old_to_mds.py", "exec"), old.__dict__)  # noqa: S102 - this repo's own history
    source = old.SourceConfig(url_list="unused", out=out)
    source.filters.min_image_size = 16
    start = time.time()
    summary = old.to_mds("bench", source, folder)
    return {"seconds": time.time() - start, "written": summary["written"]}


def child(args) -> None:
    """In the subprocess: one conversion; prints its JSON result."""
    sys.path.insert(0, REPO)
    if args.engine == "spark":
        result = run_spark(args.input, args.out, args.rows, args.cores)
    elif args.engine == "score":
        result = run_spark_score(args.input, args.out, args.cores, args.model)
    elif args.engine == "webdataset":
        result = run_webdataset(args.input + "_tars", args.out, args.cores)
    else:
        result = run_single_process(args.input, args.out)
    print("RESULT " + json.dumps(result), flush=True)


def _rss_mib(process) -> float:
    try:
        return process.memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - a process that just ended
        return 0.0


def measure(engine: str, folder: str, rows: int, cores: int, scratch: str, model: str) -> dict:
    import psutil

    out = os.path.join(scratch, f"{engine}_{rows}")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--input",
        folder,
        "--out",
        out,
        "--rows",
        str(rows),
        "--cores",
        str(cores),
        "--model",
        model,
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    driver = psutil.Process(process.pid)
    peaks = {"driver": 0.0, "jvm": 0.0, "workers": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            children = driver.children(recursive=True)
            peaks["driver"] = max(peaks["driver"], _rss_mib(driver))
            peaks["jvm"] = max(peaks["jvm"], sum(_rss_mib(c) for c in children if "java" in c.name()))
            workers = [c for c in children if "python" in c.name()]
            peaks["workers"] = max(peaks["workers"], sum(_rss_mib(c) for c in workers))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{engine} at {rows} rows failed")
    result = json.loads(stdout.split("RESULT ", 1)[1])
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + "_work", ignore_errors=True)
    shutil.rmtree(out + "_logs", ignore_errors=True)
    return {"engine": engine, "rows": rows, **result, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="side of the (flat-colour) JPEGs: 32 makes decoding nearly free, 256 is img2dataset's default",
    )
    parser.add_argument(
        "--scratch", default=None, help="where the synthetic input and outputs go (default: a temp dir)"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["single", "spark"],
        choices=["single", "spark", "score", "webdataset"],
        help="what to run",
    )
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["spark", "single", "score", "webdataset"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.engine, args.rows = args.child, args.rows[0]
        return child(args)
    scratch = args.scratch or tempfile.mkdtemp(prefix="bench_shards_")
    results = []
    model = export_tiny_clip(os.path.join(scratch, "tiny_clip")) if "score" in args.engines else ""
    for rows in args.rows:
        folder = os.path.join(scratch, f"input_{rows}")
        make_input(folder, rows, args.image_size)
        if "webdataset" in args.engines:
            make_tars(folder)
        for engine in args.engines:
            results.append(measure(engine, folder, rows, args.cores, scratch, model))
            print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(folder)
        shutil.rmtree(folder + "_tars", ignore_errors=True)
    print(
        f"\n{args.image_size}x{args.image_size} JPEGs, {args.cores} cores; rows/s per core = rows / seconds / cores"
        " (the single process uses one core)\n"
    )
    print(
        "| rows | engine | written (score: rows scored) | seconds | rows/s per core | driver peak MiB | JVM peak MiB |"
        " Spark Python workers peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        per_core = r["rows"] / r["seconds"] / (1 if r["engine"] == "single" else args.cores)
        print(
            f"| {r['rows']:,} | {r['engine']} | {r['written']:,} | {r['seconds']:.1f} | {per_core:,.0f} | "
            f"{r['driver']:.0f} | {r['jvm']:.0f} | {r['workers']:.0f} |"
        )


if __name__ == "__main__":
    main()
