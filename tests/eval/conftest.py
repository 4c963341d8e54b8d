import pytest

from megalong.runtime.launch import run_processes
from tests.eval.tiny_models import save_and_check_random_model, save_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[str, dict]:
    """A tiny random llama3-tiny-shaped model saved with save_weights, and what the megalong
    runner computed on it after loading it back (one spawned process for both)."""
    directory = str(tmp_path_factory.mktemp("weights") / "tiny")
    checks = run_processes(save_and_check_random_model, 1, (directory,))[0]
    return directory, checks


@pytest.fixture(scope="session")
def tiny_weights(tiny_model) -> str:
    return tiny_model[0]


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny random Hugging Face Llama (real vocabulary) saved with save_pretrained."""
    return save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "tiny")
