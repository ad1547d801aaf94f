"""`loraq convert`: PEFT LoRA adapter folder -> llama.cpp GGUF LoRA adapter (docs/llama-cpp.md §1)."""

from .lora_gguf import OUTTYPES, ConvertResult, convert_adapter
from .peft import LoraModule, PeftAdapter, load_peft_adapter

__all__ = ["OUTTYPES", "ConvertResult", "LoraModule", "PeftAdapter", "convert_adapter", "load_peft_adapter"]
