"""Benchmark metrics (paper section 4, appendix A): V-STAR, Charades-STA, multiple choice.

``python -m visioncoach.eval {vstar,charades,mcq} --pred PRED.jsonl --gt GT [--out metrics.json]``;
``visioncoach.predict`` writes the predictions. Modules: ``charades`` (R@k, mIoU),
``vstar`` (Acc, tIoU, vIoU, AM, LGM, mAM, mLGM), ``mcq`` (accuracy per category),
``judge`` (0-3 answer judges), ``common`` (tolerant input reading, tables, JSON output).
"""
