"""`loraq quantize`: llama-quantize's per-tensor type choice and its file layout."""
