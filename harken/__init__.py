"""Harken: a self-hostable, Omi-compatible real-time transcription gateway."""

__version__ = "0.1.0"
