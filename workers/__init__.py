"""Code that runs inside a Ray Train worker (or in-process): the loop, models, losses, metrics."""
