"""StreamDiffusion's stochastic similarity filter: skip inference on frames that barely changed."""

from __future__ import annotations

import random

import torch


class SimilarityFilter:
    """Skip a frame with probability max(0, 1 - (1 - cos) / (1 - threshold)), where cos is its
    cosine similarity to the last frame that was processed; never more than `max_skip_frames` in a row."""

    def __init__(self, threshold: float = 0.98, max_skip_frames: int = 10, seed: int = 0):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"similarity threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.max_skip_frames = max_skip_frames
        self._random = random.Random(seed)
        self._previous: torch.Tensor | None = None
        self._skipped = 0

    def reset(self) -> None:
        self._previous = None
        self._skipped = 0

    def skip_probability(self, frame: torch.Tensor) -> float:
        if self._previous is None or self._previous.shape != frame.shape:
            return 0.0
        cos = torch.nn.functional.cosine_similarity(frame.flatten().float(), self._previous.flatten().float(), dim=0)
        return max(0.0, 1.0 - (1.0 - float(cos)) / (1.0 - self.threshold))

    def should_skip(self, frame: torch.Tensor) -> bool:
        probability = self.skip_probability(frame)
        if self._skipped < self.max_skip_frames and self._random.random() < probability:
            self._skipped += 1
            return True
        self._previous = frame.detach().clone()
        self._skipped = 0
        return False
