"""Prompt sets shipped with cdmbench."""
