"""The llmc version, recorded in every engine header."""

__version__ = "0.1.0"
