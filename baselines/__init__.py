"""Baselines nlbench compares Hope against: Transformer and Titans (LMM, MAC, MAG)."""
