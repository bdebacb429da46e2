"""Data: sources and Parquet shards (``byol prepare``), sampled labelled reads, the deterministic reader
(no Ray), and the Ray Data two-view pipeline (``ray_dataset``)."""
