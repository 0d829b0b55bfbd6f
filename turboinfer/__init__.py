"""turboinfer: fast, correct LLM inference on CPUs and GPUs."""

from turboinfer.config import EngineConfig
from turboinfer.errors import TurboInferError
from turboinfer.outputs import CompletionOutput, Logprob, RequestOutput
from turboinfer.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch; import it lazily so `turboinfer --help` and the estimator start fast.
    if name == "LLM":
        from turboinfer.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob",
           "TurboInferError"]
