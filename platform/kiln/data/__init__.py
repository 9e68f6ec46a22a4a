"""Data: Parquet io, decoding, preprocessing, stratified splits, dataset hashing, built-in
sources."""
