"""`savpack extract --engine ray`: extraction for large labelled pools on Ray Data, one model per actor.

    examples (read on the driver by the one item reader) -> Ray dataset, one row per example
      -> map_batches(ExtractActor, batch_size=shard_size, compute=ActorPoolStrategy(size=workers)): each actor loads
         the model once and turns each batch into one ActivationSet shard (`savpack.pipeline.extract_activations`)
      -> the driver writes the shards, in input order, into a folder that `savpack build --activations` reads
         (ActivationSet.load joins the shards in file-name order)

Every shard records the same prompt (computed from the whole dataset, not the shard), so the shards join. Needs the
extra savpack[ray]; this module imports Ray.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import pyarrow as pa
import ray
import ray.data

from savpack_runtime.files import check_output_folder, staged_folder
from savpack_runtime.items import Example
from savpack_runtime.ray_engine import (IMAGE_TYPE, Progress, RayOptions, image_cells, image_from_cell, pipeline_context,
                                        session)

from .errors import DataError

SHARD_PATTERN = "part-{:05d}.safetensors"  # zero-padded: file-name order is input order
FIRST_SHARD = SHARD_PATTERN.format(0)  # what says a folder is a shards folder savpack wrote (--force replaces only those)


class ExtractActor:
    """One per Ray worker: loads the model once, extracts each batch of examples into one activations shard."""

    def __init__(self, model_options: dict[str, Any], extract_options: dict[str, Any], threads: int):
        import torch

        from .models import load_model

        torch.set_num_threads(threads)
        self.loaded = load_model(**model_options)
        self.extract_options = extract_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .pipeline import extract_activations

        rows = batch.to_pylist()
        examples = [Example(text=row["text"], images=tuple(image_from_cell(cell) for cell in row["images"]),
                            label=row["label"], source=row["source"], videos=tuple(row["videos"])) for row in rows]
        try:
            shard = extract_activations(self.loaded, examples, progress=False, **self.extract_options).to_bytes()
        except DataError as exc:
            # Returned, not raised: Ray Data would wrap the exception and lose its message on the way to the driver.
            return pa.table({"shard": pa.array([b""], pa.binary()), "rows": [0], "error": [str(exc)]})
        return pa.table({"shard": pa.array([shard], pa.binary()), "rows": [len(rows)],
                         "error": pa.array([None], pa.string())})


def extract_to_shards(examples: Sequence[Example], out: str | os.PathLike, model_options: dict[str, Any],
                      extract_options: dict[str, Any], options: RayOptions, shard_size: int = 256,
                      force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Extract every example on Ray into a folder of activation shards at `out`; returns a summary.

    model_options: savpack.models.load_model's arguments; extract_options: extract_activations' (template,
    batch_size, final_hidden, video_frames, token_position, shape).
    """
    out = check_output_folder(out, force, marker=FIRST_SHARD)  # refused before Ray starts
    progress = progress or Progress(verb="extracted")
    started = time.perf_counter()
    table = pa.table({
        "text": [example.text for example in examples], "images": [image_cells(example.images) for example in examples],
        "videos": [[os.path.abspath(path) for path in example.videos] for example in examples],
        "label": [example.label for example in examples], "source": [example.source for example in examples],
    }, schema=pa.schema([("text", pa.string()), ("images", pa.list_(IMAGE_TYPE)), ("videos", pa.list_(pa.string())),
                         ("label", pa.string()), ("source", pa.string())]))
    shards = 0
    with staged_folder(out, force, marker=FIRST_SHARD) as partial:
        with session(options), pipeline_context():  # shards in input order: the joined set is in input order
            # One block per shard: each is a task an idle actor can take (one block would keep one actor busy).
            blocks = [table.slice(start, shard_size) for start in range(0, table.num_rows, shard_size)]
            dataset = ray.data.from_arrow(blocks).map_batches(
                ExtractActor,
                fn_constructor_kwargs={"model_options": model_options, "extract_options": extract_options,
                                       "threads": options.threads or max(1, int(options.cpus_per_worker))},
                batch_size=shard_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=options.workers),
                num_cpus=options.cpus_per_worker,
                num_gpus=options.gpus_per_worker or None,
            )
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                for shard, rows, error in zip(*(batch.column(name).to_pylist() for name in ("shard", "rows", "error"))):
                    if error:
                        raise DataError(error)
                    (partial / SHARD_PATTERN.format(shards)).write_bytes(shard)
                    shards += 1
                    progress.update(rows)
    progress.close()
    seconds = time.perf_counter() - started
    return {"examples": progress.rows, "shards": shards, "seconds": seconds, "workers": options.workers}
