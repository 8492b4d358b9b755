"""Training stages: SFT cold start (and, to come, RL with VisionCoach Algorithm 1)."""
