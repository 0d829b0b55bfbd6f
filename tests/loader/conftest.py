import pytest

from gguf_writer import write_gguf_file


@pytest.fixture
def write_gguf():
    return write_gguf_file
