"""Model-level techniques that work on any task's model (features, explain, distill, ...)."""
