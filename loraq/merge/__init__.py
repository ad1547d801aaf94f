"""`loraq merge`: W' = W + Σ scaleᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ into a float GGUF (llama-export-lora, exact); from a
PEFT folder also what only a merge can apply (DoRA, modules_to_save, trainable tokens, a grown
vocabulary, an lm_head LoRA on tied embeddings), as PEFT's merge_and_unload computes it."""

from .merge import AdapterSpec, MergeResult, merge_model

__all__ = ["AdapterSpec", "MergeResult", "merge_model"]
