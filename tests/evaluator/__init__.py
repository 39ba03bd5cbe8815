"""Tests of evaluator/ (laid out like the packages)."""
