"""The code's shape: tower knowledge in one module, imports one way, private names still there."""

import ast
import glob
import inspect
import os
import pickle
import pickletools
import re
import subprocess
import sys

import numpy as np
import torch
from composer.callbacks import CheckpointSaver

from pipeline.checkpoint import loading, saver
from pipeline.compat import fsdp_gloo
from pipeline.compat import streaming_shm_prefix as shm_prefix
from tests.conftest import REPO

# What only pipeline/model/towers.py may know: how open_clip and timm lay out their towers.
TOWER_CHECKS = re.compile(
    r"hasattr\([^)]*\"(trunk|transformer|text|patch_drop\w*)\"|ResidualAttentionBlock|EvaBlock|\.resblocks\b|\.trunk\b"
)


def python_files(package: str) -> list:
    return sorted(glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True))


def test_tower_structure_is_known_in_one_module_only():
    offenders = [
        f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}"
        for path in python_files("pipeline")
        if not path.endswith(os.path.join("pipeline", "model", "towers.py"))
        for n, line in enumerate(open(path, encoding="utf-8"), 1)
        if TOWER_CHECKS.search(line)
    ]
    assert offenders == []
    with open(os.path.join(REPO, "pipeline", "model", "towers.py"), encoding="utf-8") as f:
        assert TOWER_CHECKS.search(f.read())  # the pattern does find such checks


def imported_modules(path: str) -> set:
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imported_packages(path: str) -> set:
    return {name.split(".")[0] for name in imported_modules(path)}


# What data_prep may use of pipeline: the torch-free shared packages (config loading, storage, tables, images).
SHARED_WITH_DATA_PREP = {
    "pipeline.config.loader",
    "pipeline.common.storage",
    "pipeline.common.images",
    "pipeline.common.tables",
}


def test_imports_go_one_way_from_data_prep_to_pipeline():
    """data_prep may use pipeline's small shared modules (the YAML loader, storage, images); never the reverse."""
    assert [p for p in python_files("pipeline") if "data_prep" in imported_packages(p)] == []
    used = {m for p in python_files("data_prep") for m in imported_modules(p) if m.split(".")[0] == "pipeline"}
    assert used and used <= SHARED_WITH_DATA_PREP, used - SHARED_WITH_DATA_PREP


# pipeline's packages, lowest first: each may import only its own layer and those below (and never
# a command: train, eval, export, sweep).
LAYERS = [
    {"config", "common"},
    {"compat"},
    {"data", "checkpoint"},
    {"model"},
    {"algorithms"},
    {"training"},
    {"run"},
    {"evaluation"},
    {"sweeps"},
]
COMMANDS = {"train", "eval", "export", "sweep"}


def pipeline_imports(path: str) -> set:
    """The pipeline packages or commands a file imports ("from pipeline import compat" included)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline."))
    return found


def test_no_package_imports_upward_nor_a_command():
    layer = {package: i for i, packages in enumerate(LAYERS) for package in packages}
    packages = sorted(
        os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO, "pipeline", "*", "__init__.py"))
    )
    assert sorted(layer) == packages  # every package has its place
    upward = [
        f"{os.path.relpath(path, REPO)} imports pipeline.{imported}"
        for package in packages
        for path in python_files(os.path.join("pipeline", package))
        for imported in pipeline_imports(path)
        if imported in COMMANDS or layer[imported] > layer[package]
    ]
    assert upward == []
    assert "pipeline.model" in {
        f"pipeline.{m}" for m in pipeline_imports(os.path.join(REPO, "pipeline", "run", "saved.py"))
    }


def test_every_package_says_what_it_owns_and_may_import():
    for init in glob.glob(os.path.join(REPO, "pipeline", "*", "__init__.py")):
        doc = ast.get_docstring(ast.parse(open(init, encoding="utf-8").read())) or ""
        assert len(doc) > 100 and "mport" in doc, init


def test_the_shared_packages_import_no_torch_when_imported():
    """config and common are what data_prep and the quick config check load: no torch, no Composer."""
    heavy = {"torch", "composer", "streaming", "open_clip", "timm"}
    for package in ("config", "common"):
        for path in python_files(os.path.join("pipeline", package)):
            tree = ast.parse(open(path, encoding="utf-8").read())
            top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
            top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
            assert not top & heavy, (path, top & heavy)


def test_importing_every_module_patches_nothing():
    """Patches of pinned libraries are applied by the entry points (pipeline/compat), not on import."""
    modules = sorted(
        os.path.relpath(p, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__") for p in python_files("pipeline")
    )
    code = f"""
import streaming.base.dataset as d, streaming.base.shared.prefix as p
from torch.distributed.fsdp._fully_shard import _fsdp_collectives as c
from composer.utils import remote_uploader as u
before = (d.get_shm_prefix, d.Spanner, p.SharedMemory, c._get_gradient_divide_factors, u.ProcessPoolExecutor)
import importlib
for name in {modules!r}:
    importlib.import_module(name)
after = (d.get_shm_prefix, d.Spanner, p.SharedMemory, c._get_gradient_divide_factors, u.ProcessPoolExecutor)
assert before == after, [b for b, a in zip(before, after) if a is not b]
from pipeline import compat
compat.apply()
assert (d.get_shm_prefix, c._get_gradient_divide_factors) != before[::3][:2]  # apply() does patch
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_module_keeps_mutable_state():
    """No module-level list, dict or set that code could change (caches are functools.cache'd functions)."""
    mutable = (ast.Dict, ast.List, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)
    found = []
    for path in python_files("pipeline") + python_files("data_prep"):
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            value = getattr(node, "value", None)
            for target in targets:
                named = isinstance(target, ast.Name)
                if named and isinstance(value, mutable) and not target.id.isupper() and target.id != "__all__":
                    found.append(f"{os.path.relpath(path, REPO)}: {target.id}")
                if isinstance(target, ast.Attribute):  # setting another module's attribute
                    found.append(f"{os.path.relpath(path, REPO)}: {ast.unparse(target)}")
    assert found == []


# ---------------------------------------------------------------------------
# Private and undocumented APIs: each one the code touches, what for, and a check that it is still
# there. A pinned upgrade that removes one fails here, by name, instead of silently changing
# behaviour (the poll back to 30 s, gradients wrong on CPU, ...).
# ---------------------------------------------------------------------------


def composer_upload_poll():
    return hasattr(CheckpointSaver(folder="unused", save_interval="1ba"), saver.UPLOAD_POLL_ATTRIBUTE)


def composer_upload_pools():
    from concurrent.futures import ThreadPoolExecutor

    from composer.utils import remote_uploader

    source = inspect.getsource(remote_uploader.RemoteUploader.__init__)
    uploader = saver.PollingCheckpointSaver("s3://bucket/run", save_interval="1ba").remote_uploader
    return (
        source.count("ProcessPoolExecutor(") == 2
        and "multiprocessing.get_context('spawn')" in source
        and isinstance(uploader.upload_executor, ThreadPoolExecutor)
        and isinstance(uploader.check_remote_files_exist_executor, ThreadPoolExecutor)
        and remote_uploader.ProcessPoolExecutor.__name__ == "ProcessPoolExecutor"  # put back afterwards
    )


def composer_saved_checkpoints():
    saver = CheckpointSaver(folder="unused", save_interval="1ba")
    return saver.all_saved_checkpoints_to_timestamp == {}


def composer_hsdp_degrees():
    from composer.core import state

    source = inspect.getsource(state._create_device_mesh)
    return "data_parallel_replicate_degree" in source and "data_parallel_shard_degree" in source


def numpy_reconstruct():
    pickled = pickle.dumps(np.arange(3, dtype=np.uint32), protocol=2)  # torch.save's protocol
    names = {arg for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"}
    reconstruct = loading._reconstruct
    return f"{reconstruct.__module__} {reconstruct.__name__}" in names


def torch_gradient_divide_factors():
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    fsdp_gloo.divide_after_summing_on_gloo()  # as the entry points apply it
    return (
        _fsdp_collectives._get_gradient_divide_factors is fsdp_gloo._sum_then_divide_on_gloo
        and list(inspect.signature(fsdp_gloo._fsdp_divide_factors).parameters)
        == ["reduce_scatter_group", "all_reduce_group", "reduce_dtype", "device_type"]
        and "_get_gradient_divide_factors(" in inspect.getsource(_fsdp_collectives.foreach_reduce)
    )


def torch_multihead_attention():
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    return attention._qkv_same_embed_dim and {"in_proj_weight", "in_proj_bias"} <= set(
        dict(attention.named_parameters())
    )


def streaming_shard_tables():
    from streaming import StreamingDataset
    from streaming.base.format.base import reader

    dataset = inspect.getsource(StreamingDataset.__init__)
    return (
        "self.spanner = " in dataset
        and "self.stream_per_shard = " in dataset
        and "self.file_pairs" in (inspect.getsource(reader))
    )


def streaming_shm_prefix():
    from streaming import StreamingDataset
    from streaming.base.shared import memory, prefix

    return (
        shm_prefix._find_and_create_prefix is prefix.get_shm_prefix
        and list(inspect.signature(prefix.get_shm_prefix).parameters)
        == ["streams_local", "streams_remote", "world", "retry"]
        and "get_shm_prefix(" in inspect.getsource(StreamingDataset.__init__)
        and shm_prefix._SharedMemory is memory.SharedMemory
        and list(inspect.signature(memory.SharedMemory).parameters) == ["name", "create", "size", "auto_cleanup"]
        and "SharedMemory(name, False)" in inspect.getsource(prefix)
    )


def streaming_spanner_and_resample():
    """StreamingDataset.__init__ builds its spanner from the module's `Spanner` name, and
    generate_work reads resample_streams' (shuffle units, sample ids)."""
    from streaming.base import dataset
    from streaming.base.batching import random

    return "Spanner(self.samples_per_shard)" in inspect.getsource(dataset.StreamingDataset.__init__) and (
        "dataset.resample_streams(epoch)" in inspect.getsource(random.generate_work_random_batching)
    )


def streaming_index_download():
    """Stream.get_shards fetches index.json with Stream._download_file, as CompactStream does, and
    builds each shard's Reader with reader_from_json from its entry."""
    from streaming import Stream

    source = inspect.getsource(Stream.get_shards)
    return "self._download_file(basename, basename + '.tmp')" in source and "reader_from_json(" in source


def atexit_registry():
    """CPython's atexit module clears and runs its registry with these (no public counterpart)."""
    import atexit

    return callable(atexit._clear) and callable(atexit._run_exitfuncs)


PRIVATE_APIS = {
    "atexit._clear and atexit._run_exitfuncs: pipeline/sweep.py runs a run's own exit handlers in the "
    "child forked for it (multiprocessing ends its children without them)": atexit_registry,
    "composer CheckpointSaver._symlink_upload_wait_before_next_try_in_seconds: "
    "pipeline/checkpoint/saver.py shortens the 30 s wait for an upload (no public argument)": composer_upload_poll,
    "composer.utils.remote_uploader.ProcessPoolExecutor / multiprocessing.get_context: "
    "pipeline/compat/composer_uploads.py uploads in threads instead of spawned processes": composer_upload_pools,
    "composer CheckpointSaver.all_saved_checkpoints_to_timestamp (undocumented): "
    "pipeline/checkpoint/saver.py signs and rotates after each save": composer_saved_checkpoints,
    "composer.core.state._create_device_mesh reading FSDP2Config.data_parallel_*_degree: "
    "pipeline/training/parallel.py HybridShardConfig": composer_hsdp_degrees,
    "numpy._core.multiarray._reconstruct: pipeline/checkpoint/loading.py allows it in weights_only loading "
    "(numpy pickles arrays with it)": numpy_reconstruct,
    "torch.distributed.fsdp._fully_shard._fsdp_collectives._get_gradient_divide_factors: "
    "pipeline/compat/fsdp_gloo.py makes FSDP2 sum then divide on gloo": torch_gradient_divide_factors,
    "torch.nn.MultiheadAttention._qkv_same_embed_dim and its packed in_proj: "
    "pipeline/algorithms/flash_attention.py swaps the module's class": torch_multihead_attention,
    "streaming StreamingDataset.spanner / stream_per_shard / shard file_pairs (undocumented): "
    "pipeline/data/loader.py names the shard and stream of a bad sample": streaming_shard_tables,
    "streaming.base.dataset.Spanner, looked up by StreamingDataset.__init__, and "
    "StreamingDataset.resample_streams (undocumented): pipeline/compat/streaming_spanner.py has it build "
    "pipeline/data/sampling.py's O(shards) spanner, which draws virtual epochs in shard passes": (
        streaming_spanner_and_resample
    ),
    "streaming Stream._download_file and the shape of Stream.get_shards (undocumented): "
    "pipeline/data/shard_index.py loads a stream's index compactly in its place": streaming_index_download,
    "streaming.base.dataset.get_shm_prefix, called by StreamingDataset.__init__, and the SharedMemory it "
    "attaches with (undocumented): pipeline/compat/streaming_shm_prefix.py registers prefixes under a "
    "machine-wide lock and closes those attachments when released instead of at exit": streaming_shm_prefix,
}
# The private names above, as the code spells them; a new one must be added to PRIVATE_APIS.
KNOWN_PRIVATE = {"_fsdp_collectives._get_gradient_divide_factors", "fsdp._fully_shard", "numpy._core"}
KNOWN_PRIVATE |= {"module._qkv_same_embed_dim", "atexit._clear", "atexit._run_exitfuncs"}
DOCUMENTED = {"os._exit"}  # public despite the underscore
PRIVATE_ACCESS = re.compile(r"\b(?!self\.|cls\.)([A-Za-z_]\w*)\.(_[a-z]\w*)")


def still_there(check) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a missing name, a changed signature: gone either way
        return False


def test_every_private_api_the_code_touches_is_listed_and_still_there():
    touched = {
        f"{m.group(1)}.{m.group(2)}"
        for package in ("pipeline", "data_prep", "bench")
        for path in python_files(package)
        for m in PRIVATE_ACCESS.finditer(open(path, encoding="utf-8").read())
    }
    assert touched - KNOWN_PRIVATE - DOCUMENTED == set(), "private APIs used but not listed in PRIVATE_APIS"
    gone = [what for what, check in PRIVATE_APIS.items() if not still_there(check)]
    assert gone == [], "gone or changed in this upgrade (find the public API, or another way):\n" + "\n".join(gone)


def test_each_test_module_reaches_xdist_as_one_group(request):
    """`make test` relies on xdist's loadgroup keeping a module (and its module-scoped runs) on one
    worker; xdist learns the group only from a suffix on the node id, which a pytest upgrade can
    silently stop (pytest-dev/pytest-xdist#1386): the suite would still pass, each run made twice."""
    assert [mark.args for mark in request.node.iter_markers("xdist_group")] == [("test_layout",)]
    if getattr(request.config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup
        assert request.node.nodeid.endswith("@test_layout"), request.node.nodeid


def test_every_algorithm_of_the_config_has_its_row_in_the_table():
    from dataclasses import fields

    from pipeline.algorithms import ALGORITHMS
    from pipeline.config.schema import AlgorithmsConfig

    assert list(ALGORITHMS) == [field.name for field in fields(AlgorithmsConfig)]
