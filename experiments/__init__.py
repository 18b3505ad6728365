"""Experiments on the trained pipeline: run each as python -m experiments.NAME from the repository root."""
