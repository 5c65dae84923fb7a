"""The TensorRT builder's child process (builder.py): `python -m llmc.backends.tensorrt FD`."""

import sys

from llmc.backends.tensorrt.builder import serve
from llmc.backends.tensorrt.lower import build_in_child

serve(build_in_child, int(sys.argv[1]))
