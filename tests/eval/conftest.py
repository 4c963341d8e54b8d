import pytest

from megalong.runtime.launch import run_processes
from tests.eval.tiny_models import save_random_model


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """A tiny random llama3-tiny-shaped model saved with save_weights (one spawned process)."""
    directory = str(tmp_path_factory.mktemp("weights") / "tiny")
    run_processes(save_random_model, 1, (directory,))
    return directory
