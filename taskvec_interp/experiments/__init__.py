"""Experiments built on the adapter interface and the engine room: sweeps (TD x shots, accuracy), patching, fine-tuning, trajectories."""
