"""Plots (matplotlib, headless): GG fits, training curves, code lengths. Imports ``gg`` and ``io`` only."""
