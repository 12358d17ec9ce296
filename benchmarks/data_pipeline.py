"""Input-pipeline throughput: decode + random resized crop + flip-ready float batches at 224 px.

Writes a JPEG folder of 256x256 crops of the bundled photo (natural-image content, so JPEG decode
costs what it costs on real photos), then times ``train_batches`` with 1 and 2 decoding threads and
with worker processes; then the same on pre-decoded uint8 arrays; then the pieces alone (JPEG
decode, crop+resize) to name the bottleneck.

    python benchmarks/data_pipeline.py --images 512 --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from vision_ft.data.decode import read_image
from vision_ft.data.files import FileSplit
from vision_ft.data.npz import ArraySplit
from vision_ft.data.pipeline import Geometry, train_batches
from vision_ft.data.records import Record
from vision_ft.data.transforms import random_resized_crop_box, resize_box

GEOMETRY = Geometry(224, "bilinear", 1.0, train_scale=(0.35, 1.0), channels=3)


def write_jpegs(directory: Path, count: int) -> list[Record]:
    photo = Image.open(str(resources.files("vision_ft") / "assets" / "chelsea.png")).convert("RGB")
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        w, h = photo.size
        side = int(rng.integers(200, min(w, h)))
        left, top = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        crop = photo.crop((left, top, left + side, top + side)).resize((256, 256), Image.Resampling.BILINEAR)
        path = directory / f"{i:05d}.jpg"
        crop.save(path, quality=90)
        records.append(Record(str(path), i % 10))
    return records


def pipeline_rate(split, *, batch: int, steps: int, threads: int, workers: int) -> float:
    stream = train_batches(
        split, GEOMETRY, batch_size=batch, seed=0, start_step=0, total_steps=steps + 1,
        threads=threads, workers=workers,
    )  # fmt: skip
    next(stream)  # start-up (thread pools, worker processes) is not throughput
    start = time.perf_counter()
    for _ in range(steps):
        next(stream)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    steps = args.images // args.batch - 1
    results: dict = {"cores": os.cpu_count(), "img_size": 224, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        records = write_jpegs(Path(tmp), args.images)
        files = FileSplit(records)
        for threads, workers in ((1, 0), (2, 0), (1, 2)):
            rate = pipeline_rate(files, batch=args.batch, steps=steps, threads=threads, workers=workers)
            results[f"jpeg_threads{threads}_workers{workers}_img_s"] = round(rate, 1)
            print(
                f"JPEG folder, {threads} thread(s), {workers} worker process(es): {rate:.0f} img/s",
                flush=True,
            )
        start = time.perf_counter()
        decoded = [read_image(r.path) for r in records]
        decode_rate = len(records) / (time.perf_counter() - start)
        arrays = np.stack([(d * 255).round().astype(np.uint8) for d in decoded])
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for image in arrays:
        box = random_resized_crop_box(rng, 256, 256, (0.35, 1.0))
        resize_box(image, 224, 224, "bilinear", box)
    resize_rate = len(arrays) / (time.perf_counter() - start)
    results["jpeg_decode_only_img_s"] = round(decode_rate, 1)
    results["crop_resize_only_img_s"] = round(resize_rate, 1)
    print(f"JPEG decode alone (1 core): {decode_rate:.0f} img/s; crop+resize alone: {resize_rate:.0f} img/s")
    in_memory = ArraySplit(arrays, np.arange(len(arrays)) % 10)
    for threads in (1, 2):
        rate = pipeline_rate(in_memory, batch=args.batch, steps=steps, threads=threads, workers=0)
        results[f"arrays_threads{threads}_img_s"] = round(rate, 1)
        print(f"pre-decoded arrays, {threads} thread(s): {rate:.0f} img/s", flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
