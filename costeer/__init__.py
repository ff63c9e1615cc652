"""CoSteer decoding: a cloud LLM steered token by token by a local small model that reads a private
context (the fused steering op lives in ``costeer_kernels``).

    from costeer import Generator
    gen = Generator()                      # embedded SmolLM2-135M-Instruct in both roles
    res = gen.generate("Suggest a weekend plan.", context="I love hiking and I live in Zurich.")
"""
from .generator import GenerationError, Generator, Request, Result, StepTiming, TextChunk, build_prompts, steer_step
from .models import DEFAULT_MODEL, LoadedModel, ModelNotFoundError, load_model
from .streams import (
    InProcessLLMStream,
    LLMStep,
    LLMStream,
    OpenAICompletionsStream,
    StreamError,
    WebSocketLLMStream,
)

__all__ = [
    "Generator",
    "Request",
    "Result",
    "StepTiming",
    "TextChunk",
    "GenerationError",
    "build_prompts",
    "steer_step",
    "load_model",
    "LoadedModel",
    "ModelNotFoundError",
    "DEFAULT_MODEL",
    "LLMStream",
    "LLMStep",
    "InProcessLLMStream",
    "WebSocketLLMStream",
    "OpenAICompletionsStream",
    "StreamError",
]
