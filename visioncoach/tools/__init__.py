"""Planning tools that run without a GPU (``python -m visioncoach.tools.memory_plan``).

Nothing here is imported by the trainer: these read its code's rules (cache buckets, kernel
chunking, DeepSpeed settings) to compute what a run would need, on paper.
"""
