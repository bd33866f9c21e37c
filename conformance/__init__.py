"""Holds each optimized technique equal to its reference and measures the claims of ../shared/SEED.md."""
