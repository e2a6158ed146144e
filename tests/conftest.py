r"""Settings shared by every test."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    r"""The tensors here are tiny: intra-op threads only add overhead, and on a
    busy 2-core machine their spinning makes each op 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_cfg(tmp_path):
    r"""Compose ``conf/train.yaml`` with overrides, as the CLI would, writing to
    ``tmp_path`` (as lightning-hydra-template's tests do)."""
    from hydra.core.hydra_config import HydraConfig

    from moegraph.train import compose_config

    def _compose(*overrides: str):
        return compose_config(overrides, tmp_path)

    yield _compose
    HydraConfig.instance().cfg = None


@pytest.fixture
def real_data(tmp_path):
    r"""Copy a real dataset folder from ``$MOEGRAPH_DATA_DIR`` into ``tmp_path``
    and return the copy's root (PyG writes ``processed/`` beside ``raw/``, so the
    shared folder is never loaded in place). Skips when the data is absent.

    Usage: ``root = real_data("Planetoid/Cora")`` gives ``tmp_path/Planetoid``
    holding ``Cora/raw``; pass it as ``root`` to the PyG dataset class.
    """
    import os
    import shutil
    from pathlib import Path

    def _copy(relative: str) -> Path:
        base = os.environ.get("MOEGRAPH_DATA_DIR")
        if not base:
            pytest.skip("real data: MOEGRAPH_DATA_DIR is not set (e.g. ../shared/data)")
        source = Path(base) / relative
        if not source.is_dir():
            pytest.skip(f"real data: {source} does not exist")
        target = tmp_path / relative
        shutil.copytree(source, target)
        return tmp_path / Path(relative).parts[0]

    return _copy
