"""The builder's Python API: build a pack from a model and labelled examples, classify and evaluate with it."""

from __future__ import annotations

import subprocess
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from savpack_runtime import Pack
from savpack_runtime import format as fmt
from savpack_runtime.errors import ModelMismatchError, SavpackWarning
from savpack_runtime.items import Example
from savpack_runtime.prompt import prompt_record
from savpack_runtime.result import Result, results_from_decisions
from savpack_runtime.scoring import Decision, pack_decision

from .calibration import DEFAULT_CLASSIFIER
from .classifier import DEFAULT_K, SavClassifier
from .data import DIGEST_CHARS, labels_of
from .errors import BuildError, DataError
from .extract import ActivationSet, Extraction, check_token_position, extract
from .metrics import calibration_report, classification_report
from .models import LoadedModel
from .versions import check_name, check_version


def producer_versions() -> dict[str, str]:
    import torch
    import transformers

    import savpack_runtime

    from . import __version__

    versions = {"savpack": __version__, "savpack-runtime": savpack_runtime.__version__,
                "torch": torch.__version__, "transformers": transformers.__version__}
    commit = _source_commit()
    if commit:
        versions["savpack_commit"] = commit
    return versions


def _source_commit() -> str | None:
    """The git commit of a development checkout of savpack (None for an installed release)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def prompt_metadata(loaded: LoadedModel, template: str, image_count: int, video_frames: int | None = None,
                    token_position: str = fmt.DEFAULT_TOKEN_POSITION) -> dict[str, Any]:
    """What a pack records of its prompt; video_frames (frames sampled per video) only when the data had videos;
    token_position only when it is not the default last token, so a decoder's pack keeps the bytes, and therefore
    the sha256 identity, that savpack versions without the field give it."""
    return prompt_record(template, loaded.render_template(template, image_count), image_count,
                         loaded.chat_template_sha256(), token_position, video_frames)


def warn_if_prompt_drops_text(template: str, examples: Sequence[Example]) -> None:
    """A prompt without {text} leaves every item's text out: text items would all render the same prompt."""
    if fmt.TEXT_PLACEHOLDER not in template and any(example.text for example in examples):
        warnings.warn(f"the prompt {template!r} holds no {fmt.TEXT_PLACEHOLDER}: the items' text is left out, so "
                      "items that differ only in text all render the same prompt and get the same head vectors",
                      SavpackWarning)


def extract_activations(loaded: LoadedModel, examples: Sequence[Example], template: str = fmt.TEXT_PLACEHOLDER,
                        batch_size: int = 8, final_hidden: bool = False, progress: bool = True,
                        video_frames: int = fmt.DEFAULT_VIDEO_FRAMES, token_position: str | None = None,
                        shape: tuple[int, int | None] | None = None) -> ActivationSet:
    """Every head's vector for labelled examples (one forward each, batched), with what a pack needs to record.
    token_position None takes the family's default (the last real token, or [CLS] for encoders).
    shape: the dataset's prompt_shape when `examples` are one shard of it (every shard then records the same prompt)."""
    if any(example.label is None for example in examples):
        raise DataError("every example needs a label to build a pack")
    warn_if_prompt_drops_text(template, examples)
    position = token_position or loaded.family.token_positions[0]
    image_count, frames = shape or prompt_shape(examples, video_frames)
    extraction = extract(loaded, examples, template, heads=None, batch_size=batch_size, final_hidden=final_hidden,
                         progress=progress, video_frames=video_frames, token_position=position)
    return ActivationSet(
        activations=extraction.vectors, labels=[example.label for example in examples], input_ids=extraction.input_ids,
        model=loaded.model_metadata(),
        prompt=prompt_metadata(loaded, template, image_count, frames, position),
        digests=[example.digest() for example in examples], sources=[example.source for example in examples],
        final_hidden=extraction.final_hidden,
    )


def prompt_shape(examples: Sequence[Example], video_frames: int) -> tuple[int, int | None]:
    """What a set's prompt records of its examples: the most common image count, and the frames per video (None
    without videos)."""
    image_counts = Counter(example.image_count(video_frames) for example in examples)
    has_videos = any(example.videos for example in examples)
    return image_counts.most_common(1)[0][0], video_frames if has_videos else None


def default_k(total_heads: int) -> int | None:
    """DEFAULT_K, or every head (None) for a model that has fewer, with a warning that says so."""
    if total_heads >= DEFAULT_K:
        return DEFAULT_K
    warnings.warn(f"the model has {total_heads} attention heads, fewer than the default k = {DEFAULT_K}: every head "
                  f"votes (k = {total_heads}); pass --k to choose", SavpackWarning)
    return None


def pack_from_activations(activations: ActivationSet, k: int | None | str = "default", scoring: str = "paper",
                          vote: str = "majority", name: str | None = None, version: str | None = None,
                          selection: dict[str, Any] | None = None, classifier: str = DEFAULT_CLASSIFIER,
                          calibration: ActivationSet | None = None, seed: int = 0) -> Pack:
    """Select heads on extracted activations, fit the scoring model and make the pack (no model needed).

    k: the number of heads that vote; None: every head; "default": DEFAULT_K, or every head of a smaller model.
    classifier: "vote", "probe" or "auto" (savpack.calibration). calibration: activations of separate labelled data
    to fit the probabilities' calibration on, instead of cross-validation over the examples."""
    if name is not None:
        check_name(name)
    if version is not None:
        check_version(version)
    if k == "default":
        _, layers, heads, _ = activations.activations.shape
        k = default_k(layers * heads)
    estimator = SavClassifier(k=k, scoring=scoring, vote=vote, classifier=classifier, random_state=seed)
    estimator.fit(activations.activations, activations.labels)
    train_accuracy = estimator.score(activations.activations, activations.labels)
    if calibration is not None:
        check_same_extraction(activations, calibration, "the calibration data")
        estimator.calibrate(calibration.activations, calibration.labels)
    elif not estimator.calibrated_:
        warnings.warn("a class has a single labelled example: nothing to fit the probabilities on out of fold, so the "
                      "pack carries no calibration (format 1) and its probabilities are the vote shares; add examples "
                      "or give --calibration", SavpackWarning)
    return estimator.to_pack(
        model=activations.model, prompt=activations.prompt, selection=selection or {},
        metrics={"train_accuracy": round(train_accuracy, 6)}, name=name, version=version,
        created_by=producer_versions(), dataset=activations.dataset,
    )


def check_same_extraction(activations: ActivationSet, other: ActivationSet, what: str) -> None:
    """Refuse activations of another model or prompt than the examples' (their head vectors would not compare)."""
    if other.model.get("fingerprint") != activations.model.get("fingerprint") or \
            list(other.model["grid"]) != list(activations.model["grid"]):
        raise BuildError(f"{what} was extracted from another model ({other.model['id']}) than the examples "
                         f"({activations.model['id']})")
    if other.prompt.get("rendered") != activations.prompt.get("rendered"):
        raise BuildError(f"{what} was extracted with another prompt than the examples: extract it with the same --prompt")


def check_pack_fits(pack: Pack, loaded: LoadedModel) -> None:
    """Refuse a pack built for another model (family, grid, weights fingerprint) or rendered by another template."""
    built_for = pack.model
    if built_for["family"] != loaded.family.name or list(built_for["grid"]) != list(loaded.grid):
        raise ModelMismatchError(
            f"pack was built for {built_for['id']} ({built_for['family']}, grid {built_for['grid']}), "
            f"not for {loaded.model_id} ({loaded.family.name}, grid {list(loaded.grid)})"
        )
    if built_for.get("fingerprint") and built_for["fingerprint"] != loaded.fingerprint():
        raise ModelMismatchError(
            f"pack was built for {built_for['id']} at revision {built_for.get('revision')}; the weights of "
            f"{loaded.model_id} differ (fingerprint {loaded.fingerprint()[:12]} != {built_for['fingerprint'][:12]})"
        )
    if (built_for["id"], built_for.get("revision")) != (loaded.model_id, loaded.revision):
        warnings.warn(
            f"pack was built from {built_for['id']} (revision {built_for.get('revision')}), the model loaded is "
            f"{loaded.model_id} (revision {loaded.revision}); the weights' fingerprints match, so the pack applies",
            SavpackWarning,
        )
    check_token_position(loaded, pack.token_position)
    prompt = pack.prompt
    rendered = loaded.render_template(prompt["template"], prompt["image_count"])
    if rendered != prompt["rendered"]:
        raise ModelMismatchError(
            f"{loaded.model_id} renders the pack's prompt differently from when the pack was built "
            f"(chat template changed?): built {prompt['rendered']!r}, now {rendered!r}"
        )


@dataclass
class Classification:
    labels: list[str | None]  # predicted label per example (None: abstained)
    decision: Decision
    extraction: Extraction

    def results(self, pack: Pack) -> list[Result]:
        """One result per example, the record every savpack consumer shares (savpack_runtime.result)."""
        return results_from_decisions({pack.name or "pack": (pack.labels, self.decision)})

    def records(self, pack: Pack) -> list[dict[str, Any]]:
        """One JSON-ready result per example: label, votes and vote shares per class."""
        return [result.to_dict() for result in self.results(pack)]


def classify(loaded: LoadedModel, pack: Pack, examples: Sequence[Example], batch_size: int = 8,
             vote: str | None = None, progress: bool = True, abstain_below: float | None = None) -> Classification:
    """Extract only the pack's heads (stopping after its deepest layer) and decide (savpack_runtime.scoring)."""
    check_pack_fits(pack, loaded)
    extraction = extract(loaded, examples, pack.prompt["template"], heads=np.asarray(pack.heads),
                         batch_size=batch_size, progress=progress, video_frames=pack.video_frames,
                         token_position=pack.token_position)
    decision = pack_decision(pack, extraction.vectors, method=vote, abstain_below=abstain_below)
    labels = [None if withheld else pack.labels[i] for i, withheld in zip(decision.predictions, decision.abstained)]
    return Classification(labels, decision, extraction)


def held_out(pack: Pack, examples: Sequence[Example]) -> tuple[list[Example], int]:
    """The examples the pack was not built from, and how many were dropped for being training examples."""
    training = set(pack.dataset.get("example_digests", []))
    kept = [example for example in examples if example.digest()[:DIGEST_CHARS] not in training]
    return kept, len(examples) - len(kept)


def training_examples(pack: Pack, examples: Sequence[Example]) -> list[Example]:
    """The examples the pack was built from (found by the digests it keeps), each once."""
    training, seen, found = set(pack.dataset.get("example_digests", [])), set(), []
    for example in examples:
        digest = example.digest()[:DIGEST_CHARS]
        if digest in training and digest not in seen:
            seen.add(digest)
            found.append(example)
    return found


def evaluation_examples(pack: Pack, examples: Sequence[Example]) -> tuple[list[Example], int]:
    """The held-out examples to evaluate on (labels checked against the pack's), and how many were skipped."""
    unknown = next((example for example in examples if example.label not in pack.labels), None)
    if unknown is not None:
        raise DataError(f"{unknown.source}: label {unknown.label!r} is not one of the pack's labels {list(pack.labels)}")
    kept, dropped = held_out(pack, examples)
    if not kept:
        raise DataError(f"all {len(examples)} examples were used to build the pack; evaluate on held-out data")
    return kept, dropped


def evaluate(loaded: LoadedModel, pack: Pack, examples: Sequence[Example], batch_size: int = 8,
             vote: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix on held-out labelled examples, and the calibration of the
    probabilities (savpack.metrics.calibration_report)."""
    kept, dropped = evaluation_examples(pack, examples)
    result = classify(loaded, pack, kept, batch_size=batch_size, vote=vote, progress=progress)
    truth = [example.label for example in kept]
    report = classification_report(truth, result.labels, pack.labels)
    report["calibration"] = calibration_report(np.array([pack.labels.index(label) for label in truth]),
                                               result.decision.probabilities, result.decision.calibrated,
                                               result.decision.predictions)
    report["skipped_training_examples"] = dropped
    return report


def require_classes(examples: Sequence[Example]) -> list[str]:
    labels = labels_of(list(examples))
    if len(labels) < 2:
        raise BuildError(f"only one class ({labels[0]!r}) in the labelled data; a classifier needs at least 2")
    return labels
