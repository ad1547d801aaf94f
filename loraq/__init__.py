"""loraq: a LoRA fine-tune to deployable llama.cpp files, with proof the fine-tune survived."""

__version__ = "0.1.0"

# Bumped whenever a stage's output bytes may change for the same inputs; it is part of every
# stage fingerprint, so a new format invalidates old checkpoints.
FORMAT_VERSION = 1
