"""The model itself: the GGUF's tokenizer and a streaming numpy inference engine with runtime LoRA,
agreeing with llama.cpp. Shared by the compare stage and the imatrix stage."""
