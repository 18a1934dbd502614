"""The code's shape: tower knowledge in one module, imports one way, private names still there."""

import ast
import glob
import os
import pickle
import pickletools
import re

import numpy as np
from composer.callbacks import CheckpointSaver

from pipeline import checkpointing
from tests.conftest import REPO

# What only pipeline/towers.py may know: how open_clip and timm lay out their towers.
TOWER_CHECKS = re.compile(
    r"hasattr\([^)]*\"(trunk|transformer|text|patch_drop\w*)\"|ResidualAttentionBlock|EvaBlock|\.resblocks\b|\.trunk\b"
)


def python_files(package: str) -> list:
    return sorted(glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True))


def test_tower_structure_is_known_in_one_module_only():
    offenders = [
        f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}"
        for path in python_files("pipeline")
        if not path.endswith(os.path.join("pipeline", "towers.py"))
        for n, line in enumerate(open(path, encoding="utf-8"), 1)
        if TOWER_CHECKS.search(line)
    ]
    assert offenders == []
    with open(os.path.join(REPO, "pipeline", "towers.py"), encoding="utf-8") as f:
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


# What data_prep may use of pipeline: small modules that import neither torch nor the training schema.
SHARED_WITH_DATA_PREP = {"pipeline.config_loader", "pipeline.paths", "pipeline.images", "pipeline.tables"}


def test_imports_go_one_way_from_data_prep_to_pipeline():
    """data_prep may use pipeline's small shared modules (the YAML loader, tables, images); never the reverse."""
    assert [p for p in python_files("pipeline") if "data_prep" in imported_packages(p)] == []
    used = {m for p in python_files("data_prep") for m in imported_modules(p) if m.split(".")[0] == "pipeline"}
    assert used and used <= SHARED_WITH_DATA_PREP, used - SHARED_WITH_DATA_PREP


def test_composer_still_has_the_private_upload_poll_we_shorten():
    """PollingCheckpointSaver sets it: Composer has no public argument for the wait between checks
    that an upload landed. If Composer renames it, this fails instead of the poll silently going
    back to 30 s."""
    saver = CheckpointSaver(folder="unused", save_interval="1ba")
    assert hasattr(saver, checkpointing.UPLOAD_POLL_ATTRIBUTE)


def test_composer_still_builds_its_upload_pools_from_the_names_we_swap_for_threads():
    """PollingCheckpointSaver uploads in threads by swapping the module names Composer's
    RemoteUploader builds its process pools and event from; if Composer stops using them, this fails
    instead of each rank silently spawning processes that re-import the training script again."""
    import inspect
    from concurrent.futures import ThreadPoolExecutor

    from composer.utils import remote_uploader

    source = inspect.getsource(remote_uploader.RemoteUploader.__init__)
    assert source.count("ProcessPoolExecutor(") == 2 and "multiprocessing.get_context('spawn')" in source
    saver = checkpointing.PollingCheckpointSaver("s3://bucket/run", save_interval="1ba")
    assert isinstance(saver.remote_uploader.upload_executor, ThreadPoolExecutor)
    assert isinstance(saver.remote_uploader.check_remote_files_exist_executor, ThreadPoolExecutor)
    assert remote_uploader.ProcessPoolExecutor.__name__ == "ProcessPoolExecutor"  # put back


def test_numpy_still_pickles_arrays_with_the_reconstructor_we_allow():
    """Composer checkpoints pickle numpy's RNG state; weights_only loading must allow exactly the
    function numpy pickles arrays with (numpy has no public name for it)."""
    pickled = pickle.dumps(np.arange(3, dtype=np.uint32), protocol=2)  # torch.save's protocol
    names = {arg for op, arg, _ in pickletools.genops(pickled) if op.name == "GLOBAL"}
    reconstruct = checkpointing._reconstruct
    assert f"{reconstruct.__module__} {reconstruct.__name__}" in names


def test_torch_still_asks_the_private_function_we_wrap_how_to_average_gradients():
    """pipeline/parallel.py makes FSDP2 sum then divide on gloo by wrapping this function; if torch
    renames it or changes its signature, this fails instead of gradients silently going wrong on CPU."""
    import inspect

    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    from pipeline import parallel

    assert _fsdp_collectives._get_gradient_divide_factors is parallel._divide_after_summing_on_gloo
    assert list(inspect.signature(parallel._fsdp_divide_factors).parameters) == [
        "reduce_scatter_group",
        "all_reduce_group",
        "reduce_dtype",
        "device_type",
    ]
    assert "_get_gradient_divide_factors(" in inspect.getsource(_fsdp_collectives.foreach_reduce)


def test_composer_still_reads_the_hsdp_degrees_from_the_fsdp2_config():
    """HybridShardConfig gives Composer the mesh degrees through these FSDP2Config properties."""
    import inspect

    from composer.core import state

    source = inspect.getsource(state._create_device_mesh)
    assert "data_parallel_replicate_degree" in source and "data_parallel_shard_degree" in source
