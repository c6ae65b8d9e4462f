import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_model():
    """The default pretrained model and tokenizer (converted once, then ~2 s to load)."""
    from cookbook import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tokenizer(real_model):
    return real_model[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine the idle thread spins.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
