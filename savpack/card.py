"""`savpack card`: a README.md for a pack, with the metadata block a model hub reads and the facts a receiver needs.

Deterministic: the same pack and options give the same text (no dates), so a card can be regenerated and diffed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from savpack_runtime import Pack

LIBRARY_NAME = "savpack"
PAPER = "https://arxiv.org/abs/2412.00142"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def hub_model_id(model_id: str) -> str | None:
    """The model id when it names a hub repository (ORG/NAME), None for a local folder or file."""
    if _HUB_ID.fullmatch(model_id) and not Path(model_id).exists():
        return model_id
    return None


def card_metadata(pack: Pack, license: str | None = None) -> dict[str, Any]:
    """The hub metadata: library_name, base_model (hub ids only), tags, pipeline_tag, license when given."""
    images = pack.prompt.get("image_count", 0)
    metadata: dict[str, Any] = {"library_name": LIBRARY_NAME}
    if license:
        metadata["license"] = license
    base = hub_model_id(pack.model["id"])
    if base:
        metadata["base_model"] = base
    metadata["pipeline_tag"] = "image-classification" if images else "text-classification"
    metadata["tags"] = ["savpack", "sparse-attention-vectors", "few-shot", "sav-pack", pack.model["family"]]
    return metadata


def _yaml_block(metadata: dict[str, Any]) -> str:
    from huggingface_hub import ModelCardData  # the hub's own writer, so the hub reads what we write

    return "---\n" + ModelCardData(**metadata).to_yaml() + "\n---\n"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(_cell(value) for value in row) + " |" for row in rows)]


def _what(pack: Pack) -> str:
    images = pack.prompt.get("image_count", 0)
    if images == 0:
        return "texts"
    return "images (with the prompt's text)" if images == 1 else f"sets of {images} images (with the prompt's text)"


def render_card(pack: Pack, sha256: str, file_name: str, license: str | None = None, image: str | None = None) -> str:
    """The card's text. `image` is a path or URL to the head map, relative to where the card will be read."""
    model, metrics, dataset = pack.model, pack.metrics, pack.dataset
    layers, heads, head_dim = pack.grid
    title = f"{pack.name} {pack.version or ''}".strip() if pack.name else Path(file_name).stem
    held_out_by_label = metrics.get("held_out_per_class_accuracy", {})
    lines = [
        f"# {title}", "",
        f"A SAV pack: a training-free classifier of {_what(pack)} into {len(pack.labels)} labels, made of {pack.k} "
        f"attention heads of `{model['id']}`. For an input, each head's output at the last prompt token votes for "
        f"its most cosine-similar class centroid; the majority wins ([Sparse Attention Vectors]({PAPER})).", "",
        "## Labels", "",
        *_table(["label", "labelled examples", "held-out accuracy"],
                [[label, count, f"{held_out_by_label[label]:.3f}" if label in held_out_by_label else "-"]
                 for label, count in zip(pack.labels, pack.class_counts.tolist())]), "",
        "## Base model", "",
        *_table(["", ""], [
            ["model", f"`{model['id']}`"], ["revision", f"`{model.get('revision')}`"], ["family", model["family"]],
            ["grid", f"{layers} layers x {heads} heads x {head_dim} head_dim"],
            ["weights fingerprint", f"`{model.get('fingerprint')}`"],
            ["prompt template", f"`{pack.prompt['template']}`"],
            ["images per input", pack.prompt.get("image_count", 0)],
        ]), "",
        "## Metrics", "",
        *_metrics_section(pack), "",
        "## Heads", "",
    ]
    if image:
        lines += [f"![head map: labelled-set accuracy of every head]({image})", ""]
    selection = pack.selection
    lines += [
        f"{pack.k} heads vote ({selection.get('vote', 'majority')} vote), chosen by {selection.get('scoring', 'paper')} "
        f"scoring; the deepest is in layer {pack.deepest_layer}, so inference stops there.", "",
        *_table(["rank", "layer", "head", "labelled-set accuracy"],
                [[rank, layer, head, f"{score:.3f}"] for rank, ((layer, head), score)
                 in enumerate(zip(pack.heads.tolist(), pack.head_scores.tolist()), 1)]), "",
        *_usage(pack, file_name), "",
        "## Provenance", "",
        *_table(["", ""], [
            ["pack", f"{pack.name or '-'} {pack.version or ''}".strip()],
            ["pack format version", pack.format_version],
            ["content sha256", f"`{sha256}`"],
            ["created by", ", ".join(f"{key} {value}" for key, value in sorted(pack.created_by.items())) or "-"],
            ["labelled data sha256", f"`{dataset['sha256']}`" if dataset.get("sha256") else "-"],
            ["selection", ", ".join(f"{key} {value}" for key, value in sorted(selection.items()))],
        ]), "",
        "## Limitations", "",
        *_limitations(pack), "",
    ]
    return _yaml_block(card_metadata(pack, license)) + "\n" + "\n".join(lines)


def _metrics_section(pack: Pack) -> list[str]:
    metrics = pack.metrics
    rows = []
    if "train_accuracy" in metrics:
        rows.append(["accuracy on the labelled examples (in-sample)", f"{metrics['train_accuracy']:.3f}", int(pack.class_counts.sum())])
    for key, label in (("held_out_accuracy", "held-out accuracy"), ("held_out_balanced_accuracy", "held-out balanced accuracy"),
                       ("held_out_macro_f1", "held-out macro F1")):
        if key in metrics:
            rows.append([label, f"{metrics[key]:.3f}", metrics.get("held_out_examples", "-")])
    lines = _table(["metric", "value", "examples"], rows) if rows else []
    if "held_out_accuracy" in metrics:
        held_out = pack.dataset.get("held_out", {})
        if held_out.get("sha256"):
            lines += ["", f"Held-out data: sha256 `{held_out['sha256']}`, none of it among the labelled examples."]
    else:
        lines += ["", "No held-out metrics are recorded. Measure them with "
                      "`savpack eval --pack PACK --model MODEL --data held_out.jsonl --record`."]
    return lines


def _usage(pack: Pack, file_name: str) -> list[str]:
    model = pack.model
    revision = model.get("revision") or ""
    revision_option = f" --revision {revision}" if hub_model_id(model["id"]) and revision and not revision.startswith("sha256:") else ""
    field = "text" if not pack.prompt.get("image_count") else "image"
    return [
        "## Usage", "",
        "With the builder (`pip install savpack`), which runs the model:", "",
        "```bash",
        f"savpack verify {file_name} --model {model['id']}{revision_option}",
        f"savpack classify --pack {file_name} --model {model['id']}{revision_option} --data items.jsonl",
        "```", "",
        f"`items.jsonl` holds one JSON object per line with a `{field}` field"
        + (" (and `text` or `question`)" if field == "image" else "") + "; each result line gives the label, the "
        "probability of each class and the votes (`--abstain-below 0.8` withholds unsure labels).", "",
        "With the runtime alone (`pip install savpack-runtime`: numpy, no torch), given the pack's head vectors for a batch "
        "(from the truncated ONNX graph that `savpack export` makes for this pack):", "",
        "```python",
        "from savpack_runtime import Pack",
        "from savpack_runtime.scoring import pack_decision",
        "",
        f'pack = Pack.load("{file_name}")',
        "# head_vectors: (batch, k, head_dim) float32, the outputs of pack.heads in order, at the last prompt token",
        "decision = pack_decision(pack, head_vectors)",
        "labels = [pack.labels[i] for i in decision.predictions]",
        "probabilities = decision.probabilities  # (batch, classes), in pack.labels order",
        "```",
    ]


def _limitations(pack: Pack) -> list[str]:
    model, metrics = pack.model, pack.metrics
    counts = ", ".join(f"{label} {count}" for label, count in zip(pack.labels, pack.class_counts.tolist()))
    items = [
        f"It works only with `{model['id']}` at revision `{model.get('revision')}`: savpack refuses a model whose "
        "family, head grid or weights fingerprint differ, or whose chat template renders the prompt differently.",
        f"Inputs must be formatted as when it was built: the prompt template `{pack.prompt['template']}`"
        + (f" and {pack.prompt['image_count']} image(s) per input." if pack.prompt.get("image_count") else ", text only."),
        f"It was built from {int(pack.class_counts.sum())} labelled examples ({counts}); head scores are accuracies "
        "on those same examples, an optimistic estimate.",
        "It is closed-set: every input gets one of its labels, even an input that belongs to none.",
        "The base model's biases and those of the labelled examples carry over.",
    ]
    if "held_out_accuracy" not in metrics:
        items.append("No held-out evaluation is recorded, so its accuracy on new data is unknown.")
    return [f"- {item}" for item in items]


def image_link(image: str | os.PathLike, card_path: str | os.PathLike | None) -> str:
    """How the card refers to the head map: a URL as is, a file relative to the card's folder."""
    text = str(image)
    if "://" in text or card_path is None:
        return text
    return Path(os.path.relpath(Path(image).resolve(), Path(card_path).resolve().parent)).as_posix()
