"""Test harnesses shipped with the package (not imported by it): :mod:`.arch_matrix`, the architecture
matrix (every causal-LM ``model_type`` of the installed transformers, tiny and random, through the
adapters, under a SIGALRM build time limit), run by ``tests/test_arch_matrix.py`` and
``scripts/arch_matrix.py``."""
