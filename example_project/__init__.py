"""The example project, a Dagster code location: ``dagster dev -m example_project``."""

from example_project.definitions import defs

__all__ = ["defs"]
