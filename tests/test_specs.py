"""The specifications in docs/ run: the JSON Schemas in docs/format.md and docs/export.md are read out of the documents
and the files savpack writes are validated against them; the documents' tables (metadata keys, tensors, validation
rows) and the schemas' required lists are held to the constants and the code. The documents cannot drift from the
code without a test failing."""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from pathlib import Path

import jsonschema
import pytest

import make_golden_packs
from savpack.sharing import push
from savpack.sharing.hub import HUB_PACK_FILE
from savpack.sharing.packfile import index_entry, read_pack
from savpack_runtime import bundle as bundle_format
from savpack_runtime import files, graph_inputs, pack as pack_module
from savpack_runtime import format as fmt
from savpack_runtime.scoring import DECISION_METHODS

ROOT = Path(__file__).resolve().parent.parent
FORMAT_DOC = ROOT / "docs" / "format.md"
EXPORT_DOC = ROOT / "docs" / "export.md"
SCHEMA_HEADER = re.compile(r"^// (?:[A-Z]\. )?(savpack\.\w+|[\w-]+\.json)\b")


def strip_comments(line: str) -> str:
    """A jsonc line without its `//` comment (a `//` inside a JSON string is kept)."""
    in_string = escaped = False
    for index, char in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif line.startswith("//", index):
            return line[:index]
    return line


def schemas(doc: Path) -> dict[str, dict]:
    """Every schema of the document's ```jsonc blocks, by the name its header comment gives (`// B. savpack.model`,
    `// bundle.json`): a schema starts at a `{` in column 0 and runs to the next one."""
    found: dict[str, dict] = {}
    for block in re.findall(r"```jsonc\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
        name = pending = lines = None
        for line in block.splitlines() + ["{"]:
            header = SCHEMA_HEADER.match(line)
            if header:
                pending = header.group(1)
            if line.startswith("{"):
                if lines is not None:
                    found[name] = json.loads("\n".join(strip_comments(text) for text in lines))
                name, lines = pending, []
            if lines is not None:
                lines.append(line)
    return found


FORMAT_SCHEMAS = schemas(FORMAT_DOC)
EXPORT_SCHEMAS = schemas(EXPORT_DOC)


def table_rows(doc: Path, section: str) -> list[list[str]]:
    """The cells of every table row in one `## ` section of a document."""
    text = doc.read_text(encoding="utf-8")
    body = text[text.index(f"## {section}"):]
    body = body[: body.find("\n## ", 1) if "\n## " in body[1:] else len(body)]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def check(schema: dict, value: object) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)


# -- the pack format (docs/format.md) ---------------------------------------------------------------------------------


def test_the_document_holds_a_schema_for_every_json_metadata_key():
    assert set(FORMAT_SCHEMAS) == set(fmt.JSON_META) | {"index.json", "savpack.json"}
    for schema in FORMAT_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_metadata_table_is_the_format_modules():
    rows = {cells[0].strip("`"): cells for cells in table_rows(FORMAT_DOC, "3. Metadata") if cells[0].startswith("`savpack.")}
    assert {key for key, cells in rows.items() if cells[1] == "yes"} == set(fmt.REQUIRED_META)
    assert {key for key, cells in rows.items() if cells[1] == "no"} == set(fmt.OPTIONAL_META)
    assert {key for key, cells in rows.items() if cells[2].startswith("JSON")} == set(fmt.JSON_META)


def test_the_tensor_table_is_the_readers():
    rows = {cells[0].strip("`"): cells for cells in table_rows(FORMAT_DOC, "2. Tensors") if cells[0].startswith("`")}
    assert set(rows) == set(fmt.TENSOR_TYPES) == set(fmt.REQUIRED_TENSORS) | set(fmt.PROBE_TENSORS)
    for name, (code, rank) in fmt.TENSOR_TYPES.items():
        assert rows[name][1] == code, name
        assert len([axis for axis in rows[name][2].strip("()").split(",") if axis.strip()]) == rank, name


def test_the_schemas_required_fields_are_the_format_modules():
    assert FORMAT_SCHEMAS[fmt.META_MODEL]["required"] == list(fmt.MODEL_FIELDS)
    prompt = FORMAT_SCHEMAS[fmt.META_PROMPT]
    assert prompt["required"] == list(fmt.PROMPT_FIELDS)
    assert prompt["properties"][fmt.PROMPT_TOKEN_POSITION]["enum"] == list(fmt.TOKEN_POSITIONS)
    assert fmt.PROMPT_VIDEO_FRAMES in prompt["properties"]
    scoring = FORMAT_SCHEMAS[fmt.META_SCORING]
    assert scoring["required"] == list(fmt.SCORING_FIELDS)
    assert scoring["properties"]["classifier"]["enum"] == list(fmt.CLASSIFIERS)
    assert scoring["properties"]["fitted_on"]["enum"] == list(fmt.FITTED_ON)
    assert FORMAT_SCHEMAS[fmt.META_SELECTION]["properties"]["vote"]["enum"] == list(DECISION_METHODS)


def written_packs() -> list[tuple[str, dict[str, str]]]:
    """(what, metadata) of packs savpack wrote: the golden packs, the golden bundles' packs (built from fixtures by
    the builder), and one with every optional prompt field."""
    paths = sorted((ROOT / "exported" / "packs").glob("v1-*.safetensors")) + \
        sorted((ROOT / "exported" / "bundles").glob("*/bundle/packs/*.safetensors"))
    packs = [(str(path.relative_to(ROOT)), files.read(path)[1]) for path in paths]
    example = make_golden_packs.example_pack()
    video = example.replace(prompt={**example.prompt, fmt.PROMPT_TOKEN_POSITION: "first", fmt.PROMPT_VIDEO_FRAMES: 3})
    packs.append(("every optional prompt field", video.to_tensors_and_metadata()[1]))
    return packs


@pytest.mark.parametrize("what, metadata", written_packs(), ids=lambda value: value if isinstance(value, str) else "")
def test_written_packs_match_the_documented_schemas(what, metadata):
    assert metadata, what
    for key in fmt.JSON_META:
        if key in metadata:
            check(FORMAT_SCHEMAS[key], json.loads(metadata[key]))


def raised_errors(function) -> set[str]:
    """Error classes a validation row raises: its own `raise X(...)` and those of the pack module's helpers it calls."""
    names, seen, queue = set(), set(), [function]
    while queue:
        current = queue.pop()
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(current)))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                names.add(node.exc.func.id)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                helper = getattr(pack_module, node.func.id, None)
                if inspect.isfunction(helper) and helper.__module__ == pack_module.__name__ and helper not in seen:
                    seen.add(helper)
                    queue.append(helper)
    return {name for name in names if name.endswith("Error")}


def test_the_validation_table_is_the_readers_rows():
    rows = {int(cells[0]): cells for cells in table_rows(FORMAT_DOC, "4. Validation order") if cells[0].isdigit()}
    assert sorted(rows) == list(range(1, 16))
    assert [number for number, _ in pack_module.VALIDATION_ROWS] == list(range(7, 16))
    for number, function in pack_module.VALIDATION_ROWS:
        documented = set(re.findall(r"`(Pack\w+Error)`", rows[number][2]))
        assert raised_errors(function) == documented, (number, function.__name__)
        assert function.__doc__.startswith(f"Row {number}:"), function.__name__
    assert rows[10][2] == "(warning)"
    loads = raised_errors_in_source(files.loads) | raised_errors_in_source(files.read_bytes)
    assert loads == {name for number in range(1, 7) for name in re.findall(r"`(Pack\w+Error)`", rows[number][2])}


def raised_errors_in_source(function) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {node.exc.func.id for node in ast.walk(tree) if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
            and isinstance(node.exc.func, ast.Name) and node.exc.func.id.endswith("Error")}


# -- bundles (docs/export.md) -----------------------------------------------------------------------------------------


def test_the_bundle_schema_is_the_readers():
    schema = EXPORT_SCHEMAS["bundle.json"]
    assert schema["required"] == list(bundle_format.BUNDLE_FIELDS)
    assert schema["properties"]["format"]["const"] == bundle_format.FORMAT_NAME
    graph = schema["properties"]["graph"]
    assert graph["required"] == list(bundle_format.GRAPH_FIELDS)
    assert set(graph["properties"]["kind"]["enum"]) == set(graph_inputs.GRAPH_INPUTS)
    assert graph["properties"]["weights"]["enum"] == list(bundle_format.WEIGHT_TYPES)
    assert graph["properties"]["output"]["const"] == graph_inputs.OUTPUT_NAME
    packs = schema["properties"]["packs"]["items"]
    assert packs["required"] == list(bundle_format.PACK_FIELDS)
    assert set(packs["properties"]) == set(bundle_format.PACK_FIELDS_2) | {bundle_format.PACK_CALIBRATED}
    assert packs["properties"]["outputs"]["required"] == list(graph_inputs.REQUIRED_SCORE_ROLES)
    assert list(packs["properties"]["outputs"]["properties"]) == list(graph_inputs.SCORE_ROLES)
    assert schema["properties"]["model"]["required"] == list(fmt.MODEL_FIELDS)
    assert schema["properties"]["prompt"]["required"] == list(fmt.PROMPT_FIELDS)


@pytest.mark.parametrize("case", sorted(path.name for path in (ROOT / "exported" / "bundles").iterdir() if path.is_dir()))
def test_golden_bundles_match_the_documented_schema(case):
    check(EXPORT_SCHEMAS["bundle.json"], json.loads((ROOT / "exported" / "bundles" / case / "bundle" / "bundle.json").read_text()))


# -- sharing (docs/format.md section 9) -----------------------------------------------------------------------------


def test_a_registry_index_and_a_hub_manifest_match_the_documented_schemas(tmp_path):
    pack_path = tmp_path / "words.safetensors"
    make_golden_packs.example_pack(name="team/words", version="1.0.0").save(pack_path)
    push(pack_path, f"file://{tmp_path / 'registry'}", card=str)
    index = json.loads((tmp_path / "registry" / "index.json").read_text())
    check(FORMAT_SCHEMAS["index.json"], index)
    entry = index["packs"]["team/words"]["1.0.0"]
    assert set(FORMAT_SCHEMAS["index.json"]["properties"]["packs"]["additionalProperties"]["additionalProperties"]["required"]) == set(entry)

    data, pack = read_pack(pack_path)
    manifest = index_entry(pack, data, HUB_PACK_FILE)  # what a hub push commits as savpack.json
    check(FORMAT_SCHEMAS["savpack.json"], manifest)
    assert set(FORMAT_SCHEMAS["savpack.json"]["required"]) == set(manifest)
