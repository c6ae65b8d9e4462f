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
