"""Tests of trainer/ (laid out like the packages)."""
