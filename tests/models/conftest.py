import pytest

from tiny_models import ARCHS, make_tiny_model


@pytest.fixture(scope="session", params=list(ARCHS))
def tiny_model(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory, request.param)
