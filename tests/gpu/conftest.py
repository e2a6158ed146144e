r"""The device fixture of the CUDA-path tests: every test body runs on the CPU
in the default suite (cheap sizes, so the code stays exercised on a machine
without a GPU) and on CUDA under the ``gpu`` marker (``pytest -m gpu``),
skipped where no CUDA device is present."""
import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device(request.param)
