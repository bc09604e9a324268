"""Prefect flows (composition only), the `qabot` command line and the local services it starts."""
