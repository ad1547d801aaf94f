"""`loraq convert`: PEFT LoRA adapter folder -> llama.cpp GGUF LoRA adapter (docs/llama-cpp.md §1);
`loraq convert-base`: Hugging Face model folder -> F16 GGUF (hf_base)."""

from .hf_base import HFBaseResult, convert_hf_base
from .lora_gguf import OUTTYPES, ConvertResult, convert_adapter
from .peft import LoraModule, PeftAdapter, load_peft_adapter

__all__ = [
    "OUTTYPES",
    "ConvertResult",
    "HFBaseResult",
    "LoraModule",
    "PeftAdapter",
    "convert_adapter",
    "convert_hf_base",
    "load_peft_adapter",
]
