"""llmc: an ahead-of-time compiler for LLMs (HF checkpoint or GGUF -> TensorRT engine)."""

from llmc.version import __version__

__all__ = ["Runner", "__version__"]


def __getattr__(name):
    # `from llmc import Runner` without importing the runtime for every `import llmc`.
    if name == "Runner":
        from llmc.runtime.runner import Runner

        return Runner
    raise AttributeError(name)

