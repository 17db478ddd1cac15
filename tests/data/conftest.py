"""Fixtures of the data tests: writing images, and expecting a one-line DataError from build_dataset."""
import numpy as np
import pytest
from PIL import Image

from engine.data.dataset import build_dataset
from engine.errors import DataError


def _write_png(path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="session")
def write_png():
    """write_png(path, pixels uint8 [H, W] or [H, W, 3]): a PNG, parent folders created."""
    return _write_png


def _raises_data_error(*must_contain, **build_kwargs) -> str:
    with pytest.raises(DataError) as caught:
        build_dataset(**build_kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in must_contain:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture(scope="session")
def raises_data_error():
    """raises_data_error(*fragments, **build_dataset_kwargs) -> message: a one-line DataError holding them."""
    return _raises_data_error
