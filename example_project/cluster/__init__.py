"""The example on Dagster's Celery executor: ``python -m example_project.cluster``."""
