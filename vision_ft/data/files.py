"""Splits of image files (folders, CSV manifests): labels known up front, pixels decoded on demand."""

from __future__ import annotations

import numpy as np

from vision_ft.data.decode import read_image
from vision_ft.data.records import Record


class FileSplit:
    """Records of one split; ``load`` decodes a file to float32 HWC scaled by its bit depth."""

    def __init__(self, records: list[Record], *, window: tuple[float, float] | None = None):
        self.records = list(records)
        self.labels = np.asarray([r.label for r in self.records], np.int64)
        self.window = window

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> np.ndarray:
        return read_image(self.records[index].path, window=self.window)

    def example_id(self, index: int) -> str:
        return self.records[index].path
