"""Data: COCO annotations, robust image decoding, format conversion, splits, Parquet."""
