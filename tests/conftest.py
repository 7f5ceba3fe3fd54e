import pytest

from tests.helpers import make_tiny_model, split


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local save_pretrained directory (model + tokenizer) of a small GPT-2 with sharp logits."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def parts3(tiny_model_dir, tmp_path_factory):
    """The tiny model split into 3 stages by the automatic plan."""
    return split(tiny_model_dir, 3, tmp_path_factory.mktemp("parts3"))
