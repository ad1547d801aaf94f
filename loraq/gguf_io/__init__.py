"""GGUF container I/O: loraq's own header parser (header.py; gguf-py is only the test oracle),
tensor data reads, and writers of the exact layout llama.cpp's C writer produces (docs/llama-cpp.md §4.8, §9)."""

from .reader import GGUFFile, TensorInfo, open_gguf
from .writer import GGUFStreamWriter, KVList, encode_kv

__all__ = ["GGUFFile", "GGUFStreamWriter", "KVList", "TensorInfo", "encode_kv", "open_gguf"]
