"""Data side of the pipeline: image sources and decoding, the LanceDB feature store, click simulation,
metrics and dataset readers."""
