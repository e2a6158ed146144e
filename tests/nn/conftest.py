r"""Settings shared by the layer tests."""
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
