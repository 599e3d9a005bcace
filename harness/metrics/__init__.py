"""Metrics: classification (accuracy, loss, perplexity) and calibration (ECE & co.)."""
