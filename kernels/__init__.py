"""Hand-written kernels for the hyla hybrid model, one folder per op.

Each op folder holds `reference.py` (plain PyTorch, the ground truth), its fast kernels, and an
`__init__.py` whose public function validates the input once and dispatches to a backend:
"reference", "triton" or "cuda" (where one exists), or "auto" to take the fastest available.
"""
