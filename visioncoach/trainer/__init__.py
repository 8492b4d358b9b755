"""Data flow stage 7: the step. Training stages on one harness.

* ``harness``: ``StageRunner``, what every stage shares (optimizer, schedule, gradient
  averaging, clipping, non-finite skips, resumable data position, checkpoints, metrics);
* ``sft``: ``SFTRunner``, the cold start (token NLL of the reference reasoning);
* ``rl``: ``RLRunner``, VisionCoach Algorithm 1 (GSPO + visual prompts on hard samples +
  self-distillation); its rules are the pure functions of ``visioncoach.algorithm``;
* ``distributed``: the DeepSpeed ZeRO and all-reduce engines; ``checkpoint``: atomic
  checkpoints; ``metrics``: per-step JSONL / TensorBoard / progress bar.
"""
