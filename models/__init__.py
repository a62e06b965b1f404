"""Backbones: resolving model names and aliases, loading tokenizers and models with their heads."""
