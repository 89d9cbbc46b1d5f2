"""tgdp: the training system for TG-DP (Teacher-Guided Dual-Path audio-visual learning)."""

__version__ = "0.1.0"
