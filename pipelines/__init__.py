"""Pipelines built on diffattn (regional control, high resolution, LaMamba-Diff)."""
