"""Fixtures shared by the functional modules: one working directory per session, so the tiny
models' conversions and the SFT data are built once for training, LoRA and their exports."""

import pytest


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("training"))
