"""Semi-supervised training methods and quality guidance.

Importing this package is cheap. `ssl.config` (SSLConfig, METHOD_NAMES) is pure Python; `ssl.base`,
`ssl.methods` (registry `METHODS`), `ssl.guidance`, `ssl.metassl`, `ssl.ema`, `ssl.losses` and
`ssl.augment` import torch and are meant for the training process only.
"""
