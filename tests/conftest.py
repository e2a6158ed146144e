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
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from moegraph.train import CONFIG_DIR

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    HydraConfig.instance().cfg = None
