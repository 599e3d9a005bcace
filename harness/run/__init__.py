"""Assembling and training one run: the experiment orchestrator, the trainer loop, checkpoints, precision."""
