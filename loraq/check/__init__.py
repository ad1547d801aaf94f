"""Preflight: valid deployment paths, architecture and tokenizer support, and each adapted tensor's
delta against the requested types' quantization noise (verdicts.py). Writes nothing."""

from .verdicts import AdapterCheck, CheckResult, PathVerdict, TensorCheck, TypeNoise, TypeSummary, check, check_config

__all__ = ["AdapterCheck", "CheckResult", "PathVerdict", "TensorCheck", "TypeNoise", "TypeSummary", "check", "check_config"]
