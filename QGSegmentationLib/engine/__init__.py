"""Training engine: the loop, checkpoints and resume, cancel, events protocol, run manifest.

Only `events`, `cancel` and `manifest` are importable without torch.
"""
