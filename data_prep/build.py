"""`make shards`: download every source of a sources YAML with img2dataset and write its MDS stream.

    python -m data_prep.build yamls/data/sample.yaml [key=value ...]
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
from data_prep.to_mds import to_mds
from pipeline.tables import align_columns


def build(cfg: SourcesConfig) -> list:
    summaries = []
    serving = sample.serve(cfg) if cfg.sample is not None else contextlib.nullcontext()
    with serving:
        for name, source in cfg.sources.items():
            start = time.time()
            folder = download(name, source, os.path.join(cfg.work_dir, "img2dataset", name))
            summary = to_mds(name, source, folder)
            summary["seconds"] = round(time.time() - start, 1)
            summaries.append(summary)
    return summaries


def format_table(summaries: list) -> str:
    reasons = sorted({k for s in summaries for k in s} - {"source", "out", "urls", "written", "seconds"})
    header = ["source", "urls", "written", *reasons, "seconds", "out"]
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
