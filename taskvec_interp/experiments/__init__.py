"""Experiments built on the adapter interface: sweeps (TD x shots, accuracy), later patching, fine-tuning, trajectories."""
