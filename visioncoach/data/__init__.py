"""Data flow stage 1: video files -> frames (decode), STGR records, synthetic data."""
