"""Importance matrices: collection through the engine (collect)."""
