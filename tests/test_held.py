"""`make shards` from data users already hold (data_prep/held.py): img2dataset's own webdataset
output of the built-in sample, DataComp-style tars, Hugging Face-style parquet and image folders."""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from streaming import StreamingDataset

from data_prep import sample
from data_prep.build import build
from data_prep.sources import FilterConfig, SourceConfig, SourcesConfig
from tests.conftest import REPO

REASONS_OF_A_BUILD = ("source", "out", "shards_done_before", "shards_fetched", "shards_read")


def stream_rows(out: str) -> list:
    """(url, sha256 of the image bytes, caption, other columns) of every sample of an MDS stream, sorted."""
    data = StreamingDataset(local=out, batch_size=1, shuffle=False)
    rows = []
    for i in range(data.num_samples):
        sample_ = data[i]
        rows.append((sample_["url"], hashlib.sha256(sample_["image"]).hexdigest(), sample_["caption"], sample_))
    return sorted(rows, key=lambda row: row[:3])


@contextlib.contextmanager
def counting_server(port: int):
    """An HTTP server on `port` that answers 404 and counts the requests it gets."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            requests.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield requests
    finally:
        server.shutdown()
        server.server_close()


def held_build(tmp_path, name: str, **source) -> dict:
    """A build of one held source into tmp_path/<name>; its summary."""
    cfg = SourcesConfig(
        work_dir=str(tmp_path / "_work"), sources={name: SourceConfig(out=str(tmp_path / name), **source)}
    )
    (summary,) = build(cfg)
    return summary


@pytest.fixture(scope="module")
def sample_tars(sample_build, tmp_path_factory):
    """img2dataset's webdataset output of the sample's web URL list (bad rows and all), downloaded
    from the loopback server as `make shards` downloads it, with the web source's options."""
    import img2dataset

    cfg, summaries = sample_build
    folder = str(tmp_path_factory.mktemp("web_tars"))
    web = cfg.sources["web"]
    with sample.serve(dataclasses.replace(cfg, sources={"web": web})):
        img2dataset.download(
            url_list=web.url_list,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=["label"],
            output_folder=folder,
            output_format="webdataset",
            encode_format="jpg",
            enable_wandb=False,
            compute_hash="sha256",
            # three tars (each a Spark task of the download)
            **{**dataclasses.asdict(web.img2dataset), "number_sample_per_shard": -(-summaries["web"]["urls"] // 3)},
        )
    return folder


def test_img2dataset_webdataset_output_builds_the_streams_of_the_url_list_and_downloads_nothing(
    spark, sample_build, sample_tars, tmp_path
):
    cfg, summaries = sample_build
    web = cfg.sources["web"]
    assert len([f for f in os.listdir(sample_tars) if f.endswith(".tar")]) > 1
    with counting_server(cfg.sample.port) as requests:  # where the sample's URLs point
        summary = held_build(
            tmp_path,
            "web",
            path=sample_tars,
            input_format="webdataset",
            extra_columns={"label": "int32"},
            filters=web.filters,
        )
    assert requests == []
    expected = {k: v for k, v in summaries["web"].items() if k not in REASONS_OF_A_BUILD}
    found = {k: v for k, v in summary.items() if k not in REASONS_OF_A_BUILD}
    assert found == expected and expected["written"] > 0
    assert {"failed_to_download", "caption_too_short", "duplicate_url"} <= set(found)  # the sample's bad rows
    held, downloaded = stream_rows(summary["out"]), stream_rows(web.out)
    assert [row[:3] for row in held] == [row[:3] for row in downloaded]
    assert [row[3]["label"] for row in held] == [row[3]["label"] for row in downloaded]
    assert summary["shards_read"] == len([f for f in os.listdir(sample_tars) if f.endswith(".tar")])


def emoji_samples(sample_build, count: int) -> list:
    """(jpeg bytes, caption) of real emoji from the sample's web stream."""
    cfg, _ = sample_build
    data = StreamingDataset(local=cfg.sources["web"].out, batch_size=1, shuffle=False)
    return [(data[i]["image"], data[i]["caption"]) for i in range(count)]


def write_tar(path: str, samples: list, truncate_at=None) -> None:
    """A webdataset tar of {key: {extension: bytes}}; cut to `truncate_at` bytes if given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data[:truncate_at] if truncate_at else data)


def datacomp_tars(folder, images: list) -> list:
    """Three DataComp-style tars (jpg or png, txt, json with uid and clip_l14_similarity_score),
    each with img2dataset's parquet beside it: the second has a member that is not an image, the
    third is cut inside its fifth sample. Returns every sample's json, the cut ones marked."""
    os.makedirs(folder, exist_ok=True)
    metas = []
    for shard in range(3):
        samples, shard_metas = [], []
        for i in range(8):
            number = shard * 8 + i
            image, caption = images[number]
            key = f"{number:09d}"
            meta = {"key": key, "uid": f"{number:032x}", "url": f"http://datacomp.example/{number}.jpg"}
            meta.update(caption=caption, status="success", clip_l14_similarity_score=round(0.1 + 0.05 * i, 2))
            if number % 3:  # a synthetic recaption, as DataComp's recaptioned pools add
                meta["recaption"] = f"a picture of {caption}"
            if shard == 1 and i == 6:
                image, meta["corrupt"] = b"\xff\xd8\xff\xe0 not a jpeg at all", True
            jpg_or_png = {"jpg": image} if number % 5 else {"png": _png(image)}
            samples.append((key, {**jpg_or_png, "txt": caption.encode(), "json": json.dumps(meta).encode()}))
            shard_metas.append(meta)
        path = os.path.join(folder, f"{shard:05d}.tar")
        write_tar(path, samples)
        pq.write_table(
            pa.Table.from_pylist([{k: v for k, v in m.items() if k != "corrupt"} for m in shard_metas]),
            path[:-4] + ".parquet",
        )
        if shard == 2:
            with tarfile.open(path) as tar:
                fifth = next(m for m in tar.getmembers() if m.name.startswith(samples[4][0]))
            with open(path, "rb") as f:
                whole = f.read()
            with open(path, "wb") as f:
                f.write(whole[: fifth.offset_data + 100])
            for meta in shard_metas[4:]:
                meta["cut"] = True
        metas += shard_metas
    return metas


def _png(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def test_datacomp_tars_in_a_bucket_filter_on_their_json_fields_and_count_a_corrupt_member_and_a_cut_tar(
    spark, sample_build, s3, s3_bucket, tmp_path
):
    metas = datacomp_tars(tmp_path / "tars", emoji_samples(sample_build, 24))
    for file in os.listdir(tmp_path / "tars"):  # read from the bucket: tars streamed, parquets beside them
        s3.client().upload_file(str(tmp_path / "tars" / file), s3_bucket, f"pool/{file}")
    pool = f"s3://{s3_bucket}/pool"
    where = "clip_l14_similarity_score >= 0.3"
    settings = dict(
        path=pool, input_format="webdataset", filters=FilterConfig(where=where), caption_columns=["recaption"]
    )
    summary = held_build(tmp_path, "pool", **settings)
    read = [m for m in metas if "cut" not in m]
    kept = [m for m in read if m["clip_l14_similarity_score"] >= 0.3]
    cut = [m for m in metas if "cut" in m]
    assert summary["urls"] == len(metas)  # the samples the cut lost are rows too (from the parquet beside it)
    assert summary["filtered_by_where"] == len(read) - len(kept) + sum(
        1 for m in cut if m["clip_l14_similarity_score"] < 0.3
    )
    assert summary["truncated_tar"] == sum(1 for m in cut if m["clip_l14_similarity_score"] >= 0.3)
    assert summary["corrupt_image"] == sum(1 for m in kept if m.get("corrupt"))
    assert summary["written"] == len(kept) - summary["corrupt_image"]
    rows = stream_rows(summary["out"])
    assert sorted(row[0] for row in rows) == sorted(m["url"] for m in kept if not m.get("corrupt"))
    by_url = {m["url"]: m for m in kept}
    assert all(row[2] == by_url[row[0]]["caption"] for row in rows)
    assert all(row[3]["recaption"] == by_url[row[0]].get("recaption", "") for row in rows)  # kept, "" where none

    again = held_build(tmp_path, "pool", **settings)
    assert again["shards_read"] == 0 and again["shards_done_before"] == 3  # resumes by tar shard
    os.remove(tmp_path / "_work" / "img2dataset" / "pool" / "00001_stats.json")  # as if killed in that shard
    third = held_build(tmp_path, "pool", **settings)
    assert (third["shards_read"], third["shards_done_before"]) == (1, 2)
    assert stream_rows(third["out"])[0][:3] == rows[0][:3] and len(stream_rows(third["out"])) == len(rows)


def test_a_hugging_face_parquet_and_an_image_folder_build_and_read_back(spark, sample_build, tmp_path):
    images = emoji_samples(sample_build, 12)
    (tmp_path / "hf").mkdir()
    table = pa.Table.from_pylist(
        [
            {"image": {"bytes": image, "path": f"{i}.jpg"}, "text": caption, "id": i}
            for i, (image, caption) in enumerate(images[:6])
        ]
    )
    pq.write_table(table, tmp_path / "hf" / "train-00000-of-00001.parquet")
    hf = held_build(
        tmp_path,
        "hf",
        path=str(tmp_path / "hf"),
        image_column="image",
        caption_col="text",
        extra_columns={"id": "int32"},
    )
    assert hf["written"] == 6
    assert {(row[1], row[2], row[3]["id"]) for row in stream_rows(hf["out"])} == {
        (hashlib.sha256(image).hexdigest(), caption, i) for i, (image, caption) in enumerate(images[:6])
    }

    for layout in ("metadata", "txt"):
        folder = tmp_path / f"folder_{layout}"
        (folder / "part").mkdir(parents=True)
        meta = []
        for i, (image, caption) in enumerate(images[6:]):
            (folder / "part" / f"{i}.jpg").write_bytes(image)
            if layout == "txt":
                (folder / "part" / f"{i}.txt").write_text(caption)
            meta.append({"file_name": f"part/{i}.jpg", "caption": caption})
        if layout == "metadata":
            (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
        built = held_build(tmp_path, f"folder_{layout}", path=str(folder), input_format="imagefolder")
        assert built["written"] == 6 and built.get("duplicate_url", 0) == 0  # no URLs: none duplicates another
        assert {(row[1], row[2]) for row in stream_rows(built["out"])} == {
            (hashlib.sha256(image).hexdigest(), caption) for image, caption in images[6:]
        }


def run_build(tmp_path, source: dict):
    path = tmp_path / "sources.yaml"
    path.write_text(
        json.dumps({"work_dir": str(tmp_path / "_work"), "sources": {"held": {"out": str(tmp_path / "o"), **source}}})
    )
    return subprocess.run(
        [sys.executable, "-m", "data_prep.build", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "source, message",
    [
        ({"input_format": "webdataset", "path": "EMPTY"}, "no .tar files in"),
        ({"input_format": "webdataset", "path": "TEXT_ONLY"}, "holds no image"),
        ({"input_format": "webdataset", "url_list": "x.parquet"}, "set path, not url_list"),
        ({"path": "HF", "image_column": "picture"}, "has no 'picture'"),
        ({"input_format": "webdataset", "path": "IMAGES", "caption_columns": ["recaption_b"]}, "has no 'recaption_b'"),
    ],
)
def test_bad_held_inputs_are_one_line_and_exit_2_before_spark(tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text_only").mkdir()
    write_tar(str(tmp_path / "text_only" / "00000.tar"), [("0", {"txt": b"a caption", "json": b"{}"})])
    (tmp_path / "hf").mkdir()
    pq.write_table(pa.Table.from_pylist([{"image": b"x", "caption": "c"}]), tmp_path / "hf" / "0.parquet")
    (tmp_path / "images").mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    write_tar(str(tmp_path / "images" / "0.tar"), [("0", {"png": png.getvalue(), "json": b'{"recaption_a": "x"}'})])
    folders = {"EMPTY": "empty", "TEXT_ONLY": "text_only", "HF": "hf", "IMAGES": "images"}
    source = {k: str(tmp_path / folders[v]) if isinstance(v, str) and v in folders else v for k, v in source.items()}
    result = run_build(tmp_path, source)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "_work" / "logs" / "spark.log")  # Spark never started
