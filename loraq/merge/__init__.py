"""`loraq merge`: W' = W + Σ scaleᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ into a float GGUF (llama-export-lora, exact)."""

from .merge import AdapterSpec, MergeResult, merge_model

__all__ = ["AdapterSpec", "MergeResult", "merge_model"]
