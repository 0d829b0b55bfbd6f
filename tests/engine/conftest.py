import pytest

from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory, "llama-gqa-llama3rope-tied")


@pytest.fixture(scope="session")
def llm(tiny_llama):
    from turboinfer import LLM

    return LLM(tiny_llama[0], dtype="float32", max_model_len=256, kv_cache_memory="32MiB", block_size=8)
