"""llmc: an ahead-of-time compiler for LLMs (HF checkpoint or GGUF -> TensorRT engine)."""

__version__ = "0.1.0"


def __getattr__(name):
    # `from llmc import Runner` without importing the runtime for every `import llmc`.
    if name == "Runner":
        from llmc.runtime.runner import Runner

        return Runner
    raise AttributeError(name)

