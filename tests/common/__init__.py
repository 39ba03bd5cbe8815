"""Tests of common/ (laid out like the packages)."""
