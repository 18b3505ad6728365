"""Data for the pipeline: tokenisation, file formats, the built-in world and real-data preparation."""
