"""Splits of image files (folders, CSV manifests): labels known up front, pixels decoded on demand."""

from __future__ import annotations

import numpy as np

from vision_ft.data.decode import read_image
from vision_ft.data.records import Record


class FileSplit:
    """Records of one split; ``load`` decodes a file to float32 HWC scaled by its bit depth.

    ``labels`` holds each record's class index, or with ``multi_label_classes`` set, an
    (N, classes) multi-hot uint8 row per record."""

    def __init__(
        self,
        records: list[Record],
        *,
        window: tuple[float, float] | None = None,
        multi_label_classes: int | None = None,
    ):
        self.records = list(records)
        if multi_label_classes is None:
            self.labels = np.asarray([r.label for r in self.records], np.int64)
        else:
            self.labels = np.zeros((len(self.records), multi_label_classes), np.uint8)
            for i, record in enumerate(self.records):
                self.labels[i, list(record.labels or (record.label,))] = 1
        self.window = window

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> np.ndarray:
        return read_image(self.records[index].path, window=self.window)

    def example_id(self, index: int) -> str:
        return self.records[index].path
