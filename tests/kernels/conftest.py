"""Triton kernels against their PyTorch twins. Without CUDA the kernels run in Triton's interpreter on CPU
tensors; TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any kernel module is
imported. With CUDA they are compiled and run on the GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
