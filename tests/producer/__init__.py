"""Tests of producer/ (laid out like the packages)."""
