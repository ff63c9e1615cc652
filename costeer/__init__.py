"""CoSteer decoding: a cloud LLM steered token by token by a local small model that reads a private
context (the fused steering op lives in ``costeer_kernels``).

    from costeer import Generator
    gen = Generator()                      # embedded SmolLM2-135M-Instruct in both roles
    res = gen.generate("Suggest a weekend plan.", context="I love hiking and I live in Zurich.")

The names below are imported on first use (PEP 562): ``costeer serve`` and ``costeer models`` start
without the decoding loop and the kernels, ``costeer generate`` without the server.
"""
from importlib import import_module

_EXPORTS = {
    "Generator": "loop",
    "Request": "types",
    "Result": "types",
    "StepTiming": "types",
    "TextChunk": "types",
    "GenerationError": "types",
    "build_prompts": "loop",
    "steer_step": "loop",
    "load_model": "models",
    "LoadedModel": "models",
    "ModelNotFoundError": "models",
    "DEFAULT_MODEL": "models",
    "LLMStream": "llm",
    "LLMStep": "llm",
    "InProcessLLMStream": "llm",
    "WebSocketLLMStream": "llm",
    "OpenAICompletionsStream": "llm",
    "StreamError": "llm",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'costeer' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
