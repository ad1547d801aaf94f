"""GGUF container I/O: gguf-py parses the header; loraq reads tensor data and writes files with
the exact layout llama.cpp's C writer produces (reference §4.8, §9)."""

from .reader import GGUFFile, TensorInfo, open_gguf
from .writer import GGUFStreamWriter, KVList, encode_kv

__all__ = ["GGUFFile", "GGUFStreamWriter", "KVList", "TensorInfo", "encode_kv", "open_gguf"]
