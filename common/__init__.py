"""Contracts shared by producer, trainer and evaluator: shapes, codec, draft model, wire schema."""

from common.shapes import DEFAULT_SHAPE, RFSQShape

__all__ = ["DEFAULT_SHAPE", "RFSQShape"]
