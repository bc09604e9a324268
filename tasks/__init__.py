"""Prefect tasks: thin wrappers around one `pipeline_lib` call each (caching, retries, artifacts)."""
