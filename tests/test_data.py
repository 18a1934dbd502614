"""The training dataset: shard hashes checked on first read, undecodable samples replaced and counted,
COCO-style captions chosen per epoch."""

import atexit
import glob
import io
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter

from pipeline.common.images import decode_rgb
from pipeline.compat import streaming_shm_prefix as shm_prefix
from pipeline.data.loader import CLIPStreamingDataset, CorruptShardError


def _to_tensor(data: bytes, rng):
    return torch.from_numpy(np.array(decode_rgb(data)))


def _dataset(local: str, name: str = "unit", augment=_to_tensor, **kwargs) -> CLIPStreamingDataset:
    return CLIPStreamingDataset(
        local=local,
        batch_size=1,
        shuffle=False,
        augment=augment,
        tokenizer=lambda text: [text],
        stream_names=[name],
        **kwargs,
    )


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(out, images: list, hashes=("sha1", "xxh64")) -> str:
    with MDSWriter(out=str(out), columns={"image": "bytes", "caption": "str"}, hashes=list(hashes)) as writer:
        for i, image in enumerate(images):
            writer.write({"image": image, "caption": f"sample {i}"})
    return str(out)


def test_a_corrupt_shard_stops_training_naming_stream_and_shard(sample_build, tmp_path):
    cfg, _ = sample_build
    local = shutil.copytree(cfg.sources["coco"].out, tmp_path / "coco")
    shard = sorted(glob.glob(os.path.join(local, "*", "shard.*.mds")))[0]
    with open(shard, "r+b") as f:  # 4 KB of flipped bytes in the middle of the shard
        f.seek(os.path.getsize(shard) // 2)
        block = f.read(4096)
        f.seek(-len(block), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in block))
    dataset = _dataset(str(local), name="coco")
    with pytest.raises(CorruptShardError, match=rf"stream 'coco': shard {shard} is corrupt .*delete it"):
        for i in range(dataset.num_samples):
            dataset[i]
    unchecked = _dataset(str(local), name="coco", validate_hash=None)
    assert unchecked[0][0].shape == (28, 28, 3)  # without the check the shard is read as it is


def test_undecodable_samples_are_replaced_counted_and_capped(tmp_path):
    local = _write(tmp_path / "mds", [_png(10), b"not an image at all", _png(30), _png(40)])
    dataset = _dataset(local)
    image, caption, sample_id = dataset[1]
    assert caption == "sample 2" and int(image[0, 0, 0]) == 30  # the next sample, every time
    assert sample_id == dataset.next_epoch * dataset.num_samples + 2  # the id of the sample it stands in for
    assert dataset.bad_samples == 1
    assert [dataset[i][1] for i in (0, 2, 3)] == ["sample 0", "sample 2", "sample 3"]
    strict = _dataset(str(local), max_bad_samples=0)
    with pytest.raises(
        RuntimeError, match=r"stream 'unit': sample 1 in .*shard.00000.mds cannot be decoded.*max_bad_samples"
    ):
        strict[1]


def test_streams_without_hashes_are_read_unchecked(tmp_path):
    local = _write(tmp_path / "mds", [_png(10)], hashes=())
    assert _dataset(local)[0][1] == "sample 0"


def test_coco_captions_are_chosen_per_epoch_deterministically(sample_build):
    cfg, _ = sample_build
    dataset = _dataset(cfg.sources["coco"].out, name="coco")
    chosen = {}
    for epoch in range(6):
        dataset.next_epoch = epoch
        chosen[epoch] = [dataset[i][1] for i in range(40)]
    dataset.next_epoch = 3
    assert [dataset[i][1] for i in range(40)] == chosen[3]  # the same (seed, epoch, sample), the same caption
    for i in range(40):
        captions = dataset.get_item(i)["captions"]
        assert {chosen[e][i] for e in chosen} <= set(captions)
    assert sum(len({chosen[e][i] for e in chosen}) == 2 for i in range(40)) > 30  # both captions get used


def test_augmentation_depends_on_the_sample_not_on_what_the_worker_read_before(tmp_path):
    """What exact resumption with any number of workers needs: no RNG history between samples."""
    from pipeline.data.augment import Augment

    buffers = []
    for i in range(6):
        buffer = io.BytesIO()
        Image.effect_noise((64, 48), 40 + 10 * i).convert("RGB").save(buffer, "JPEG")
        buffers.append(buffer.getvalue())
    augment = Augment(32, (0.5, 1.0), True, (0.5,) * 3, (0.25,) * 3)
    dataset = _dataset(_write(tmp_path / "mds", buffers), augment=augment.on_cpu)
    forward = [dataset[i][0] for i in range(6)]
    backward = [dataset[i][0] for i in reversed(range(6))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    dataset.next_epoch = 1  # another epoch, other crops
    assert not torch.equal(dataset[0][0], forward[0])


def _build_datasets(local: str, count: int, start, built, errors) -> None:
    # A forked child leaves by os._exit, and Python's resource tracker then unlinks what it left
    # in no order, which races with datasets starting elsewhere. Like a job that exits, it unlinks
    # its own shared memory, in order, once every child has built its datasets.
    atexit._clear()  # the parent's handlers, which would unlink the parent's shared memory
    start.wait()
    failure = None
    try:
        for _ in range(count):
            _dataset(local)
    except Exception as err:  # noqa: BLE001 - reported to the test, which names it
        failure = repr(err)
    errors.put(failure)
    built.wait(timeout=120)
    atexit._run_exitfuncs()


def test_jobs_starting_together_on_one_machine_each_get_their_own_shared_memory(tmp_path):
    """streaming alone lets two processes take the same free /dev/shm prefix, and one then fails with
    FileExistsError (mosaicml/streaming#884); here 6 processes build 3 datasets each at once."""
    locals_ = [_write(tmp_path / str(i), [_png(i)]) for i in range(6)]
    context = multiprocessing.get_context("fork")  # the parent's streaming, patched by tests/conftest.py
    start, built, errors = context.Event(), context.Barrier(len(locals_)), context.Queue()
    processes = [context.Process(target=_build_datasets, args=(local, 3, start, built, errors)) for local in locals_]
    for process in processes:
        process.start()
    start.set()
    failures = [errors.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=120)
    assert failures == [None] * len(locals_)
    assert [process.exitcode for process in processes] == [0] * len(locals_)


def test_a_lock_held_too_long_is_waited_for_then_gone_around_with_a_warning(tmp_path, monkeypatch, caplog):
    from filelock import FileLock

    local = _write(tmp_path / "held", [_png(0)])
    monkeypatch.setattr(shm_prefix, "LOCK_WAIT_S", 0.5)
    with FileLock(shm_prefix.LOCK_PATH), caplog.at_level("WARNING", logger="pipeline.compat.streaming_shm_prefix"):
        dataset = _dataset(local)
    assert dataset.num_samples == 1
    assert f"{shm_prefix.LOCK_PATH} held for 0.5 s by another job" in caplog.text


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_building_a_dataset_holds_the_same_files_however_many_prefixes_are_in_dev_shm(tmp_path):
    """streaming attaches to every prefix in /dev/shm to find a free one and, alone, keeps each
    attachment open until exit: the files a new dataset holds grew with the datasets before it (and
    with what killed jobs left), until a long test worker ran out of files."""
    local = _write(tmp_path / "shards", [_png(0)])
    datasets, held = [], []
    for _ in range(12):
        before = _open_files()
        datasets.append(_dataset(local))
        held.append(_open_files() - before)
    # Its own shared memory and locks (the first also opens what the process opens once), no more
    # for each prefix already there: unpatched, the 12th held 144 files, the 2nd 24.
    assert held[-1] == held[1] <= 16, held


def test_caption_columns_are_chosen_in_their_configured_proportions(tmp_path):
    """data.captions {caption: 0.3, recaption_a: 0.7} over 20 epochs of 150 samples (a tenth without
    a recaption): each column within its binomial 99% interval; the same draw for the same epoch."""
    columns = {"image": "bytes", "caption": "str", "recaption_a": "str"}
    with MDSWriter(out=str(tmp_path / "s"), columns=columns, hashes=["xxh64"]) as writer:
        for i in range(150):
            writer.write({"image": _png(i), "caption": f"alt {i}", "recaption_a": "" if i % 10 == 0 else f"re {i}"})
    dataset = _dataset(str(tmp_path / "s"), augment=lambda data, rng: 0, captions={"caption": 0.3, "recaption_a": 0.7})
    drawn = {}
    for epoch in range(20):
        dataset.next_epoch = epoch
        drawn[epoch] = [dataset[i][1] for i in range(150)]
    with_both = [caption for epoch in drawn.values() for i, caption in enumerate(epoch) if i % 10]
    n, recaptioned = len(with_both), sum(caption.startswith("re ") for caption in with_both)
    half_width = 2.576 * (0.7 * 0.3 / n) ** 0.5
    assert abs(recaptioned / n - 0.7) < half_width, (recaptioned, n)
    assert all(epoch[i] == f"alt {i}" for epoch in drawn.values() for i in range(0, 150, 10))  # no recaption: alt text
    dataset.next_epoch = 7
    assert [dataset[i][1] for i in range(150)] == drawn[7]
