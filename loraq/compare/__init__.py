"""Scoring candidates against the reference: llama-perplexity KL-divergence metrics, reports, gates."""
