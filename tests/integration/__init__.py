"""End-to-end tests across processes (producer + trainer + evaluator) and the command lines."""
