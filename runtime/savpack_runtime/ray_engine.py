"""`savpack-run classify --engine ray`: the same classification on Ray Data, from one machine to a cluster.

    read (JSONL / Parquet, local paths or any filesystem URL Ray Data reads; one row per item with its source)
      -> map_batches(ClassifyActor, compute=ActorPoolStrategy(size=workers)): one Classifier per actor
      -> the driver streams the (source, record) rows, in input order, into one file (output.write_results)

Ray adds transport only: every item goes through the runtime's `Classifier` and leaves as its `Result.to_dict()`
record. A worker that dies mid-run loses nothing: Ray Data restarts its actor and retries the batch it held
(map_batches' defaults: max_restarts=-1, max_task_retries=-1), and the driver receives each batch's output once.

Needs the extra `savpack-runtime[ray]` (Ray Data, pyarrow); this module imports Ray, so import it only to use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import pyarrow as pa
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource

from .bundle import Bundle
from .classifier import Classifier
from .errors import DataError, InputError, SavpackError
from .images import ImageBytes
from .items import DEFAULT_FIELDS, JSONL_SUFFIXES, PARQUET_SUFFIXES, Fields, item_from_record, jsonl_records, parquet_records
from .output import check_output, write_results

# Rows per block a read task yields: reading streams (workers start before a file is read), each block is a task an
# idle actor can take, and a batch retried after a worker died redoes at most one block.
BLOCK_ROWS = 1024
BLOCK_BYTES = 256 * 1024
# Rows per actor call, in forwards of --batch-size items: the Classifier sorts a call's rows by token count before it
# batches them (less padding, as the single-process command sorts all its items), and Ray's cost per call is shared.
FORWARDS_PER_CALL = 16
ACTOR_NAME = "ClassifyActor"  # part of the worker processes' titles: ray::MapWorker(MapBatches(ClassifyActor))


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:port": an existing cluster
    workers: int = 2  # actors, each with its own Classifier
    batch_size: int = 8  # items per actor call, and per forward
    cpus_per_worker: float = 1.0  # Ray CPUs reserved per actor; onnxruntime threads default to this
    gpus_per_worker: float = 0.0
    providers: str = "cpu"
    threads: int | None = None
    check_weights: bool = True  # each actor's Classifier.load hashes the graph weights (savpack-run --no-check-weights)
    abstain_below: float | None = None  # withhold labels whose top probability is below it (savpack-run --abstain-below)


class ClassifyActor:
    """One per Ray worker: loads the bundle once, classifies each batch of rows it is handed."""

    def __init__(self, bundle: str, providers: str, threads: int | None, batch_size: int, check_weights: bool = True,
                 abstain_below: float | None = None):
        self.abstain_below = abstain_below
        self.classifier = Classifier.load(bundle, providers=providers, threads=threads, batch_size=batch_size,
                                          check_weights=check_weights)

    def __call__(self, batch: pa.Table) -> pa.Table:
        sources = batch.column("source").to_pylist()
        items = [{"text": text, "images": [image_from_cell(image) for image in images]}
                 for text, images in zip(batch.column("text").to_pylist(), batch.column("images").to_pylist())]
        try:
            results = self.classifier.classify_batch(items, abstain_below=self.abstain_below)
        except InputError:
            # Returned, not raised: Ray Data would wrap the exception and lose its message on the way to the driver.
            error = _name_the_item(self.classifier, sources, items)
            return pa.table({"source": sources, "record": pa.nulls(len(sources), pa.string()),
                             "error": pa.array([error] + [None] * (len(sources) - 1), pa.string())})
        records = [json.dumps(result.to_dict(), ensure_ascii=False) for result in results]
        return pa.table({"source": sources, "record": records, "error": pa.nulls(len(sources), pa.string())})


def _name_the_item(classifier: Classifier, sources: list[str], items: list[dict[str, Any]]) -> str:
    """The batch's error again, naming the item's source instead of its index in the batch."""
    for source, item in zip(sources, items):
        try:
            classifier.classify_batch([item])
        except InputError as exc:
            return f"{source}: {str(exc).removeprefix('item 0: ')}"
    return f"{sources[0]} .. {sources[-1]}: this batch failed, though each of its items passes alone"


class ItemsDatasource(FileBasedDatasource):
    """JSONL or Parquet files as rows (source, text, images): the runtime's item reader, inside Ray's read tasks."""

    def __init__(self, paths: Sequence[str], fields: Fields = DEFAULT_FIELDS, **kwargs: Any):
        self._fields = fields
        self._user_names = [_resolved_prefix(path) for path in paths]  # (what Ray reads, what the user wrote)
        # Local paths absolute: the read tasks of a running cluster do not share the driver's working folder.
        super().__init__([path if "://" in path else resolved for (resolved, _), path in zip(self._user_names, paths)], **kwargs)
        self._local = all("://" not in path or path.startswith("file://") for path in paths)

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> pa.NativeFile:
        try:
            if path.lower().endswith(PARQUET_SUFFIXES):
                return filesystem.open_input_file(path)  # Parquet's footer comes first: random access, not a stream
            return super()._open_input_source(filesystem, path, **open_args)
        except OSError as exc:  # e.g. a path that exists for the driver but not on the worker's node
            raise DataError(f"{self._display_name(path)}: cannot open on a Ray worker: {exc}") from None

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        name = self._display_name(path)
        folder = Path(path).parent if self._local else None
        suffix = Path(path).suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            records = parquet_records(f, name, self._fields)
        elif suffix in JSONL_SUFFIXES:
            try:
                records = jsonl_records(f.readall().decode("utf-8").splitlines(), name)
            except UnicodeDecodeError as exc:
                raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        else:
            raise DataError(f"{name}: --engine ray reads .jsonl and .parquet files, not {suffix or 'files without a suffix'}")
        block: list[tuple[str, dict[str, Any]]] = []
        for source, record in records:
            block.append((source, item_from_record(record, source, folder, self._fields)))
            if len(block) == BLOCK_ROWS:
                yield _rows_table(block)
                block = []
        if block:
            yield _rows_table(block)

    def _display_name(self, path: str) -> str:
        """The file as the user named it (relative path, or URL with its scheme), as the single-process run names it."""
        for resolved, given in self._user_names:
            if path == resolved:
                return given
            if path.startswith(resolved.rstrip("/") + "/"):
                return given.rstrip("/") + path[len(resolved.rstrip("/")):]
        return path


def _resolved_prefix(path: str) -> tuple[str, str]:
    if path.startswith("file://"):
        return path[len("file://"):], path
    if "://" in path:
        return path.split("://", 1)[1], path
    return os.path.abspath(path), path


# An image travels as a file path, or as its encoded bytes (a Parquet cell) with the name messages give it.
IMAGE_TYPE = pa.struct([("path", pa.string()), ("data", pa.binary())])


def image_cells(images: Sequence[str | ImageBytes]) -> list[dict[str, Any]]:
    """Images as IMAGE_TYPE cells; local paths made absolute (actors may run in another working folder)."""
    return [{"path": image.name, "data": image.data} if isinstance(image, ImageBytes)
            else {"path": image if "://" in str(image) else os.path.abspath(image), "data": None} for image in images]


def image_from_cell(cell: dict[str, Any]) -> str | ImageBytes:
    return cell["path"] if cell["data"] is None else ImageBytes(cell["data"], cell["path"])


def _rows_table(rows: list[tuple[str, dict[str, Any]]]) -> pa.Table:
    return pa.table({
        "source": pa.array([source for source, _ in rows], pa.string()),
        "text": pa.array([item["text"] for _, item in rows], pa.string()),
        "images": pa.array([image_cells(item["images"]) for _, item in rows], pa.list_(IMAGE_TYPE)),
    })


class Progress:
    """Rows done and rows per second on stderr: one updating line on a terminal, a line every `every` s otherwise."""

    def __init__(self, stream: TextIO | None = None, every: float | None = None, verb: str = "classified"):
        self.verb = verb
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 10.0)
        self.started = time.perf_counter()
        self.rows = 0
        self.last = 0.0

    def update(self, rows: int) -> None:
        self.rows += rows
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._print(now, end="\r" if self.tty else "\n")

    def close(self) -> None:
        self._print(time.perf_counter(), end="\n")

    def _print(self, now: float, end: str) -> None:
        elapsed = max(now - self.started, 1e-9)
        print(f"{self.verb} {self.rows:,} rows in {elapsed:.0f} s ({self.rows / elapsed:,.0f} rows/s)",
              end=end, file=self.stream, flush=True)


def connect(options: RayOptions) -> bool:
    """Join the cluster at options.address, or start a local Ray sized for the workers. True if this call started it."""
    if ray.is_initialized():
        return False
    # Ray Data's own log lines (execution plans, "progress bars disabled", user errors with their stack) would bury the
    # progress line and the one-line error this module makes of a user error; other errors are raised as they come.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": True}
    if options.address is None:
        # Local mode: logical CPUs for every actor, whatever the machine has (the actors' threads share its cores).
        cpus = max(os.cpu_count() or 1, int(options.workers * options.cpus_per_worker + 0.999))
        kwargs.update(num_cpus=cpus, include_dashboard=False)
    else:
        kwargs["address"] = options.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise SavpackError(f"cannot reach Ray at {options.address or 'a new local instance'}: {exc}") from None
    return True


@contextlib.contextmanager
def pipeline_context() -> Iterator[ray.data.DataContext]:
    """Ray Data settings for savpack's pipelines, restored after (the caller's own Ray Data work keeps its own)."""
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars, context.target_max_block_size)
    context.execution_options.preserve_order = True  # output rows in input order, as the single-process run writes
    context.enable_progress_bars = False  # ours counts rows; Ray's per-operator bars would interleave with it
    # Ray coalesces a read task's output up to 128 MiB per block: a 100,000-line file became one block, and no actor
    # started before the file was read (76 s on this machine); blocks of BLOCK_BYTES stream (first rows after 15 s).
    context.target_max_block_size = BLOCK_BYTES
    try:
        yield context
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars, context.target_max_block_size = saved


def classify_dataset(bundle: str | os.PathLike, data: Sequence[str], options: RayOptions,
                     on_rows: Callable[[int], None] | None = None,
                     fields: Fields = DEFAULT_FIELDS) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Batches of (source, record), in input order, classified on Ray. Ray must be initialised (see `connect`)."""
    bundle = str(Path(bundle).resolve())  # actors may run in another working directory
    total = 0
    with pipeline_context():
        # Read tasks reserve no CPU: the actors may hold every CPU of a small cluster, and a read task waiting for one
        # would stall the run.
        dataset = ray.data.read_datasource(ItemsDatasource(data, fields), num_cpus=0)
        classified = dataset.map_batches(
            ClassifyActor,
            fn_constructor_kwargs={"bundle": bundle, "providers": options.providers,
                                   "threads": options.threads or max(1, int(options.cpus_per_worker)),
                                   "batch_size": options.batch_size, "check_weights": options.check_weights,
                                   "abstain_below": options.abstain_below},
            batch_size=options.batch_size * FORWARDS_PER_CALL,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_cpus=options.cpus_per_worker,
            num_gpus=options.gpus_per_worker or None,
        )
        for batch in classified.iter_batches(batch_format="pyarrow", batch_size=None):
            errors = [error for error in batch.column("error").to_pylist() if error]
            if errors:
                raise InputError(errors[0])
            rows = list(zip(batch.column("source").to_pylist(), map(json.loads, batch.column("record").to_pylist())))
            total += len(rows)
            if on_rows is not None:
                on_rows(len(rows))
            yield rows
    if not total:
        raise InputError(f"{', '.join(data)}: holds no items")


def classify_to_file(bundle: str | os.PathLike, data: Sequence[str], out: str | os.PathLike, options: RayOptions,
                     force: bool = False, progress: Progress | None = None,
                     on_rows: Callable[[int], None] | None = None, fields: Fields = DEFAULT_FIELDS) -> dict[str, Any]:
    """Classify every item of `data` on Ray and write one row per item to `out`; returns a summary."""
    Bundle.load(bundle)  # a broken bundle fails here, before Ray starts
    check_output(out, force)
    for path in data:
        if "://" not in path and not Path(path).exists():
            raise InputError(f"{path}: file does not exist")
    started = time.perf_counter()
    progress = progress or Progress()
    first_rows: list[float] = []

    def counted(rows: int) -> None:
        if not first_rows:
            first_rows.append(time.perf_counter() - started)
        progress.update(rows)
        if on_rows is not None:
            on_rows(rows)

    with session(options):
        rows = write_results(out, classify_dataset(bundle, data, options, counted, fields), force)
    progress.close()
    seconds = time.perf_counter() - started
    # seconds: from Ray's start (or connection) to the last row written; first_rows_seconds: until the first rows came
    # back (Ray's start, the actors loading the bundle, the first batches).
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds, "workers": options.workers,
            "first_rows_seconds": first_rows[0] if first_rows else None}


@contextlib.contextmanager
def session(options: RayOptions) -> Iterator[None]:
    """Ray connected for the block (and shut down after, if the block started it); a user error raised in a Ray task
    or actor comes out as one SavpackError with its own message, not Ray's wrapping of it."""
    started = connect(options)
    try:
        yield
    except Exception as exc:
        if isinstance(exc, SavpackError) and not isinstance(exc, ray.exceptions.RayError):
            raise
        cause = user_error(exc)
        if cause is None:
            raise
        raise SavpackError(cause) from None
    finally:
        if started:
            ray.shutdown()


def user_error(exc: BaseException) -> str | None:
    """The message of the SavpackError inside a Ray error, if there is one."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, SavpackError) and not isinstance(current, ray.exceptions.RayError) and current.args and isinstance(current.args[0], str):
            return current.args[0].split("\n")[0]  # Ray appends its retry advice on further lines
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None
