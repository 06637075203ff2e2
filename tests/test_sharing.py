"""Sharing packs: identity, held-out metrics, cards, verify, folder registries, and the hub through huggingface_hub
(offline behaviour for real, the transport replaced at the client's boundary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner

import make_golden_packs as golden_tool

from savpack.cli import main
from savpack.errors import IdentityError, SharingError
from savpack.sharing import FolderRegistry, HubRef, RegistryRef, parse_ref
from savpack.versions import check_name, check_version, latest, sorted_versions
from savpack_runtime import Pack

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if ok:
        assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    return result


def write_pack(folder: Path, name: str = "team/words", version: str = "1.0.0", seed: int = 0) -> Path:
    path = folder / f"{name.replace('/', '_')}-{version}-{seed}.safetensors"
    golden_tool.example_pack(name=name, version=version, seed=seed).save(path, force=True)
    return path


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# -- acceptance ----------------------------------------------------------------------------------------------------

def test_build_card_push_pull_verify_through_the_cli(tmp_path, model_dir, text_task):
    model = model_dir("qwen2")
    train, test = text_task
    pack_path = tmp_path / "words.safetensors"
    cli("build", "--model", model, "--data", train, "--out", pack_path, "--k", "5", "--name", "team/words", "--version", "1.2.0")
    built_hash = Pack.load(pack_path).content_hash()

    recorded = cli("eval", "--pack", pack_path, "--model", model, "--data", test, "--json", "--record")
    report = json.loads(recorded.stdout)
    pack = Pack.load(pack_path)
    assert pack.metrics["held_out_accuracy"] == round(report["accuracy"], 6)
    assert pack.metrics["held_out_examples"] == report["examples"]
    assert pack.dataset["held_out"]["examples"] == report["examples"]
    assert pack.content_hash() != built_hash  # recording made a new artifact

    cli("card", pack_path, "--license", "apache-2.0")
    card = (tmp_path / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "savpack" and meta["license"] == "apache-2.0" and "savpack" in meta["tags"]
    assert "base_model" not in meta  # a local folder is not a hub id
    assert "held-out accuracy" in card and pack.content_hash() in card
    assert all(f"| {label} | 8 |" in card for label in pack.labels)

    registry = tmp_path / "registry"
    cli("push", pack_path, registry.as_uri())
    other = tmp_path / "elsewhere"
    other.mkdir()
    pulled = cli("pull", f"{registry.as_uri()}/team/words@1.2.0", "--out", other)
    pulled_path = other / "words-1.2.0.safetensors"
    assert str(pulled_path) in pulled.output
    assert pulled_path.read_bytes() == pack_path.read_bytes()

    verified = cli("verify", pulled_path, "--model", model, "--json")
    result = json.loads(verified.stdout)
    statuses = {check["name"]: check["status"] for check in result["checks"]}
    assert result["ok"] and result["verdict"] == "OK"
    assert statuses["integrity"] == statuses["model"] == statuses["format version"] == "pass"
    assert (result["name"], result["version"]) == ("team/words", "1.2.0")


# -- identity and versions -----------------------------------------------------------------------------------------

def test_semantic_versions_are_validated_and_ordered_by_precedence():
    for good in ("0.0.0", "1.2.3", "10.20.30", "1.0.0-alpha", "1.0.0-rc.1", "1.0.0-x-y.7.z.92"):
        assert check_version(good) == good
    for bad in ("1.2", "v1.2.3", "01.2.3", "1.2.3-", "1.2.3-01", "1.2.3 ", "", "1.2.3-a..b"):
        with pytest.raises(IdentityError, match="not a semantic version"):
            check_version(bad)
    with pytest.raises(IdentityError, match="build metadata"):
        check_version("1.2.3+build.5")
    # semver.org's own precedence example, shuffled
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
               "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0", "1.10.0", "2.0.0"]
    assert sorted_versions(reversed(ordered)) == ordered
    assert latest(["1.9.0", "1.10.0", "2.0.0-rc.1"]) == "1.10.0"  # a pre-release is never latest while a release exists
    assert latest(["2.0.0-rc.1", "2.0.0-beta"]) == "2.0.0-rc.1"


def test_pack_names_must_be_path_safe():
    assert check_name("team/safety-classifier") == "team/safety-classifier"
    for bad in ("../etc", "team/../x", "a/b/c", "/abs", "with space", ".hidden", "", "x" * 97):
        with pytest.raises(IdentityError):
            check_name(bad)


def test_build_refuses_a_bad_version_before_loading_any_model(tmp_path):
    result = cli("build", "--model", tmp_path / "no-such-model", "--data", tmp_path / "none.jsonl",
                 "--out", tmp_path / "p.safetensors", "--version", "1.2", ok=False)
    assert result.exit_code == 2
    assert "--version" in result.output and "'1.2' is not a semantic version" in result.output
    assert "no-such-model" not in result.output


# -- cards ---------------------------------------------------------------------------------------------------------

def test_card_for_a_hub_model_names_it_as_base_model_and_links_the_head_map(tmp_path):
    path = tmp_path / "p.safetensors"
    pack = golden_tool.example_pack()
    pack.replace(model={**pack.model, "id": "Qwen/Qwen2-VL-2B-Instruct"}).save(path)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "heads.png").write_bytes(b"\x89PNG\r\n")
    out = tmp_path / "card" / "README.md"
    out.parent.mkdir()
    cli("card", path, "--out", out, "--image", tmp_path / "plots" / "heads.png")
    card = out.read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and "license" not in meta
    assert "](../plots/heads.png)" in card  # relative to the card's folder
    assert "--revision 0123456789abcdef" in card  # usage pins the hub revision
    assert cli("card", path, "--out", out, ok=False).exit_code == 1  # exists: needs --force
    printed = cli("card", path, "--out", "-").stdout
    assert printed.startswith("---\n") and "head map" not in printed
    assert cli("card", path, "--out", "-").stdout == printed  # deterministic


def test_card_says_when_no_held_out_metrics_are_recorded(tmp_path):
    path = tmp_path / "p.safetensors"
    pack = golden_tool.example_pack()
    pack.replace(metrics={"train_accuracy": 1.0}).save(path)
    card = cli("card", path, "--out", "-").stdout
    assert "No held-out metrics are recorded" in card and "--record" in card


# -- verify --------------------------------------------------------------------------------------------------------

def test_verify_fails_on_a_changed_file_and_on_a_wrong_hash(tmp_path):
    path = write_pack(tmp_path)
    digest = Pack.load(path).content_hash()
    ok = json.loads(cli("verify", path, "--sha256", digest, "--json").stdout)
    assert ok["ok"] and ok["sha256"] == digest

    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 0x01  # lowest mantissa bit of the first float: still a valid pack
    path.write_bytes(bytes(data))
    (tmp_path / (path.name + ".sha256")).write_text(f"{digest}  {path.name}\n")
    result = cli("verify", path, ok=False)
    assert result.exit_code == 1
    assert "FAIL  integrity" in result.output and "FAILED: integrity" in result.output
    assert "PASS  valid" in result.output


def test_verify_reports_an_unreadable_a_newer_and_an_unknown_key_pack(tmp_path):
    golden = ROOT / "exported" / "packs"
    newer = json.loads(cli("verify", golden / "v3-newer.safetensors", "--json", ok=False).stdout)
    check = next(c for c in newer["checks"] if c["name"] == "format version")
    assert not newer["ok"] and check["status"] == "fail" and "pip install --upgrade savpack-runtime" in check["detail"]

    unknown = json.loads(cli("verify", golden / "v1-unknown-key.safetensors", "--json").stdout)
    statuses = {c["name"]: c["status"] for c in unknown["checks"]}
    assert unknown["ok"] and statuses["valid"] == "warn" and statuses["canonical"] == "warn"

    missing = cli("verify", tmp_path / "nope.safetensors", ok=False)
    assert missing.exit_code == 1 and "file does not exist" in missing.output and "Traceback" not in missing.output


def test_verify_with_another_model_fails_naming_both(tmp_path, model_dir, text_task):
    train, _ = text_task
    pack_path = tmp_path / "p.safetensors"
    cli("build", "--model", model_dir("qwen2"), "--data", train, "--out", pack_path, "--k", "3", "--name", "w", "--version", "0.1.0")
    result = cli("verify", pack_path, "--model", model_dir("llama"), ok=False)
    assert result.exit_code == 1
    assert "FAIL  model" in result.output and "FAILED: model" in result.output


def test_verify_with_a_copy_of_the_model_warns_but_passes(tmp_path, model_dir, text_task):
    import shutil

    train, _ = text_task
    pack_path = tmp_path / "p.safetensors"
    cli("build", "--model", model_dir("qwen2"), "--data", train, "--out", pack_path, "--k", "3")
    copy = shutil.copytree(model_dir("qwen2"), tmp_path / "copy")
    result = json.loads(cli("verify", pack_path, "--model", copy, "--json").stdout)
    model = next(check for check in result["checks"] if check["name"] == "model")
    assert result["ok"] and model["status"] == "warn" and "fingerprints match" in model["detail"]
    identity = next(check for check in result["checks"] if check["name"] == "identity")
    assert identity["status"] == "warn" and "no name" in identity["detail"]


def test_record_refuses_a_vote_override(tmp_path):
    path = write_pack(tmp_path)
    result = cli("eval", "--pack", path, "--model", "x", "--data", "y", "--vote", "cosine", "--record", ok=False)
    assert result.exit_code == 2 and "--record" in result.output


# -- folder registries ---------------------------------------------------------------------------------------------

def test_registry_keeps_versions_side_by_side_and_pulls_latest_by_semver(tmp_path):
    registry = tmp_path / "registry"
    uri = registry.as_uri()
    packs = {version: write_pack(tmp_path, version=version, seed=seed)
             for seed, version in enumerate(["1.2.0", "1.10.0", "1.9.3", "2.0.0-rc.1"])}
    for path in packs.values():
        cli("push", path, uri)
    cli("push", write_pack(tmp_path, name="other", version="0.1.0"), uri)

    rows = json.loads(cli("list", uri, "--json").stdout)
    assert [(row["name"], row["version"]) for row in rows] == [
        ("other", "0.1.0"), ("team/words", "1.2.0"), ("team/words", "1.9.3"), ("team/words", "1.10.0"), ("team/words", "2.0.0-rc.1")]
    assert [row["version"] for row in rows if row["latest"]] == ["0.1.0", "1.10.0"]
    assert len(json.loads(cli("list", f"{uri}/team/words", "--json").stdout)) == 4

    out = tmp_path / "out"
    out.mkdir()
    cli("pull", f"{uri}/team/words@latest", "--out", out)
    assert (out / "words-1.10.0.safetensors").read_bytes() == packs["1.10.0"].read_bytes()
    cli("pull", f"{uri}/team/words@2.0.0-rc.1", "--out", out)
    assert (out / "words-2.0.0-rc.1.safetensors").read_bytes() == packs["2.0.0-rc.1"].read_bytes()
    cli("pull", f"{uri}/team/words", "--out", out)  # no version: latest

    missing = cli("pull", f"{uri}/team/words@3.0.0", "--out", out, ok=False)
    assert missing.exit_code == 1 and "has no version 3.0.0" in missing.output and "1.10.0" in missing.output


def test_a_pushed_version_is_immutable_unless_forced(tmp_path):
    registry = tmp_path / "registry"
    first, second = write_pack(tmp_path, seed=0), write_pack(tmp_path, seed=1)
    cli("push", first, registry.as_uri())
    assert "unchanged" in cli("push", first, registry.as_uri()).output
    refused = cli("push", second, registry.as_uri(), ok=False)
    assert refused.exit_code == 1 and "immutable" in refused.output and "--force" in refused.output
    assert (registry / "team/words/1.0.0.safetensors").read_bytes() == first.read_bytes()

    assert "replaced" in cli("push", second, registry.as_uri(), "--force").output
    assert (registry / "team/words/1.0.0.safetensors").read_bytes() == second.read_bytes()
    index = json.loads((registry / "index.json").read_text())
    assert index["packs"]["team/words"]["1.0.0"]["sha256"] == Pack.load(second).content_hash()


@pytest.mark.parametrize("version, message", [
    (2, "registry format version 2 is newer than this reader's 1; upgrade with: pip install --upgrade savpack"),
    (0, "registry format version 0 is not supported: this savpack reads version(s) [1], an earlier release wrote it"),
    ("1", "registry format_version is '1', expected an integer"),
])
def test_a_registry_of_another_format_version_is_refused_with_the_right_advice(tmp_path, version, message):
    registry = tmp_path / "registry"
    cli("push", write_pack(tmp_path), f"file://{registry}")
    index = json.loads((registry / "index.json").read_text())
    (registry / "index.json").write_text(json.dumps({**index, "format_version": version}))
    result = cli("list", f"file://{registry}", ok=False)
    assert result.exit_code == 1 and message in result.output


def test_pull_refuses_a_corrupted_registry_file_and_writes_nothing(tmp_path):
    registry = tmp_path / "registry"
    cli("push", write_pack(tmp_path), registry.as_uri())
    stored = registry / "team/words/1.0.0.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0x01
    stored.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    result = cli("pull", f"{registry.as_uri()}/team/words@1.0.0", "--out", out, ok=False)
    assert result.exit_code == 1 and "differs from the recorded" in result.output
    assert list(out.iterdir()) == []


def test_push_needs_a_name_and_version_and_a_registry_folder(tmp_path):
    unnamed = tmp_path / "unnamed.safetensors"
    golden_tool.example_pack(name=None, version=None).save(unnamed)
    result = cli("push", unnamed, (tmp_path / "registry").as_uri(), ok=False)
    assert "no name" in result.output and "--version" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = cli("push", write_pack(tmp_path), (tmp_path / "busy").as_uri(), ok=False)
    assert "not a savpack registry" in result.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_registry_lock_serialises_pushes(tmp_path):
    registry = FolderRegistry.create_or_open(RegistryRef(tmp_path / "registry"))
    pack = write_pack(tmp_path)
    done = []
    with registry.locked():
        pusher = threading.Thread(target=lambda: done.append(FolderRegistry(registry.root).push(pack)))
        pusher.start()
        time.sleep(0.5)
        assert pusher.is_alive() and registry.read_index()["packs"] == {}  # waiting for the lock
    pusher.join(10)
    assert done and done[0].status == "added"
    assert "1.0.0" in registry.read_index()["packs"]["team/words"]


@pytest.mark.slow
def test_concurrent_pushes_from_processes_lose_nothing(tmp_path):
    registry = tmp_path / "registry"  # created by whichever push comes first
    workers, per_worker = 4, 5
    batches = [[write_pack(tmp_path, name=f"team/p{worker}", version=f"1.{index}.0", seed=worker * 10 + index)
                for index in range(per_worker)] for worker in range(workers)]
    code = "import sys; from savpack.sharing import push; [push(p, sys.argv[1], card=str) for p in sys.argv[2:]]"
    processes = [subprocess.Popen([sys.executable, "-c", code, registry.as_uri(), *map(str, batch)]) for batch in batches]
    assert [process.wait(120) for process in processes] == [0] * workers

    index = json.loads((registry / "index.json").read_text())
    assert sum(len(versions) for versions in index["packs"].values()) == workers * per_worker
    for batch in batches:
        for path in batch:
            pack = Pack.load(path)
            entry = index["packs"][pack.name][pack.version]
            assert entry["sha256"] == pack.content_hash()
            assert (registry / entry["file"]).read_bytes() == path.read_bytes()
    assert not [p for p in registry.rglob("*.tmp")]


def test_references_are_parsed_or_refused_clearly():
    assert parse_ref("org/repo@1.2.0") == HubRef("org/repo", "1.2.0")
    assert parse_ref("org/repo") == HubRef("org/repo", None)
    ref = parse_ref("file:///srv/registry/team/words@latest")
    assert (ref.path, ref.version) == (Path("/srv/registry/team/words"), "latest")
    assert parse_ref("file:///srv/my%20registry").path == Path("/srv/my registry")
    for bad in ("words", "a/b/c", "https://huggingface.co/org/repo", "file://host/registry", "org/repo@", "file:///r/x@"):
        with pytest.raises(SharingError):
            parse_ref(bad)


# -- the hub -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_hub_offline_mode_gives_a_clear_error_not_a_traceback(tmp_path):
    pack = write_pack(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    for args in (["pull", "org/words@1.0.0", "--out", str(tmp_path)], ["push", str(pack), "org/words"], ["list", "org/words"]):
        done = subprocess.run([sys.executable, "-m", "savpack.cli", *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr and "org/words" in done.stderr
    assert not (tmp_path / "words-1.0.0.safetensors").exists()


class FakeHub:
    """The hub behind HfApi and hf_hub_download: commits hold files, tags point at commits."""

    def __init__(self, folder: Path):
        self.folder, self.commits, self.tags = folder, {}, {}

    def create_repo(self, api, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def list_repo_refs(self, api, repo_id, **kwargs):
        return SimpleNamespace(tags=[SimpleNamespace(name=tag, target_commit=oid) for tag, oid in self.tags.items()])

    def create_commit(self, api, repo_id, operations, commit_message, **kwargs):
        oid = f"{len(self.commits) + 1:040x}"
        stored = {}
        for operation in operations:
            with operation.as_file() as handle:
                stored[operation.path_in_repo] = handle.read()
        self.commits[oid] = stored
        return SimpleNamespace(oid=oid)

    def create_tag(self, api, repo_id, tag, revision, **kwargs):
        assert tag not in self.tags
        self.tags[tag] = revision

    def delete_tag(self, api, repo_id, tag, **kwargs):
        del self.tags[tag]

    def model_info(self, api, repo_id, revision=None, **kwargs):
        return SimpleNamespace(sha=self.tags.get(revision, revision))

    def download(self, repo_id, filename, revision=None, **kwargs):
        data = self.commits[self.tags.get(revision, revision)][filename]
        path = self.folder / f"{revision}-{filename}"
        path.write_bytes(data)
        return str(path)

    def patches(self):
        import huggingface_hub

        methods = [mock.patch.object(huggingface_hub.HfApi, name, autospec=True, side_effect=getattr(self, name))
                   for name in ("create_repo", "list_repo_refs", "create_commit", "create_tag", "delete_tag", "model_info")]
        return [*methods, mock.patch("huggingface_hub.hf_hub_download", side_effect=self.download),
                mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", False)]


@pytest.fixture
def fake_hub(tmp_path):
    hub = FakeHub(tmp_path / "hub-cache")
    hub.folder.mkdir()
    patches = hub.patches()
    mocks = {patch.attribute: patch.start() for patch in patches}
    yield hub, mocks
    for patch in patches:
        patch.stop()


def test_hub_push_is_one_tagged_commit_and_pull_returns_the_same_bytes(tmp_path, fake_hub):
    hub, mocks = fake_hub
    pack = write_pack(tmp_path, version="1.2.0")
    cli("push", pack, "org/words", "--license", "mit")

    mocks["create_repo"].assert_called_once_with(mock.ANY, "org/words", private=False, exist_ok=True)
    (_, repo_id), kwargs = mocks["create_commit"].call_args
    assert repo_id == "org/words" and kwargs["commit_message"] == "team/words 1.2.0"
    stored = hub.commits[hub.tags["1.2.0"]]
    assert sorted(stored) == ["README.md", "pack.safetensors", "savpack.json"]
    assert stored["pack.safetensors"] == pack.read_bytes()
    manifest = json.loads(stored["savpack.json"])
    assert manifest["sha256"] == Pack.load(pack).content_hash() and manifest["version"] == "1.2.0"
    assert front_matter(stored["README.md"].decode())["license"] == "mit"
    mocks["create_tag"].assert_called_once_with(mock.ANY, "org/words", tag="1.2.0", revision=hub.tags["1.2.0"])

    out = tmp_path / "out"
    out.mkdir()
    cli("pull", "org/words@1.2.0", "--out", out)
    assert (out / "words-1.2.0.safetensors").read_bytes() == pack.read_bytes()
    mocks["model_info"].assert_called_with(mock.ANY, "org/words", revision="1.2.0")
    pinned = hub.tags["1.2.0"]
    assert [call.kwargs["revision"] for call in mocks["hf_hub_download"].call_args_list[-2:]] == [pinned, pinned]
    assert json.loads(cli("verify", out / "words-1.2.0.safetensors", "--json").stdout)["ok"]


def test_hub_push_refuses_to_move_a_version_and_pull_latest_follows_semver(tmp_path, fake_hub):
    hub, mocks = fake_hub
    cli("push", write_pack(tmp_path, version="1.2.0", seed=0), "org/words")
    assert "unchanged" in cli("push", write_pack(tmp_path, version="1.2.0", seed=0), "org/words").output
    refused = cli("push", write_pack(tmp_path, version="1.2.0", seed=1), "org/words", ok=False)
    assert refused.exit_code == 1 and "immutable" in refused.output
    assert mocks["create_commit"].call_count == 1

    newer = write_pack(tmp_path, version="1.10.0", seed=2)
    cli("push", newer, "org/words")
    cli("push", write_pack(tmp_path, version="2.0.0-rc.1", seed=3), "org/words")
    rows = json.loads(cli("list", "org/words", "--json").stdout)
    assert [row["version"] for row in rows] == ["1.2.0", "1.10.0", "2.0.0-rc.1"]
    out = tmp_path / "out"
    out.mkdir()
    cli("pull", "org/words@latest", "--out", out)
    assert (out / "words-1.10.0.safetensors").read_bytes() == newer.read_bytes()


def test_hub_pull_refuses_bytes_that_differ_from_the_manifest(tmp_path, fake_hub):
    hub, _ = fake_hub
    cli("push", write_pack(tmp_path), "org/words")
    stored = hub.commits[hub.tags["1.0.0"]]
    stored["pack.safetensors"] = stored["pack.safetensors"][:-1] + bytes([stored["pack.safetensors"][-1] ^ 1])
    out = tmp_path / "out"
    out.mkdir()
    result = cli("pull", "org/words@1.0.0", "--out", out, ok=False)
    assert result.exit_code == 1 and "differs from the recorded" in result.output
    assert list(out.iterdir()) == []


def test_hub_errors_become_savpack_errors(tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    response = SimpleNamespace(status_code=404, headers={}, url="https://hub/api", request=None)
    error = RepositoryNotFoundError("404 Client Error: Repository Not Found", response=mock.Mock(**response.__dict__))
    with mock.patch("huggingface_hub.HfApi.model_info", side_effect=error), \
         mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", False):
        result = cli("pull", "org/missing@1.0.0", "--out", tmp_path, ok=False)
    assert result.exit_code == 1 and "org/missing@1.0.0: repository not found" in result.output


def _edit_index(registry: Path, change) -> None:
    index = json.loads((registry / "index.json").read_text())
    change(index["packs"])
    (registry / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("change, message", [
    (lambda packs: packs.update({"team/words": ["1.0.0"]}), "entry 'team/words': must map versions to entries, got list"),
    (lambda packs: packs.update({"../up": {}}), "entry '../up': pack name '../up' is not valid"),
    (lambda packs: packs["team/words"].update({"one": packs["team/words"]["1.0.0"]}), "entry team/words@one: pack version 'one'"),
    (lambda packs: packs["team/words"]["1.0.0"].pop("sha256"), "entry team/words@1.0.0: must be an object with 'file'"),
    (lambda packs: packs["team/words"]["1.0.0"].update(file="../../outside.safetensors"),
     "entry team/words@1.0.0: file '../../outside.safetensors' points outside the registry"),
    (lambda packs: packs["team/words"]["1.0.0"].update(file="/etc/passwd"), "entry team/words@1.0.0: file '/etc/passwd' points outside"),
])
def test_a_bad_index_entry_is_refused_naming_the_index_file(tmp_path, change, message):
    registry = tmp_path / "registry"
    cli("push", write_pack(tmp_path), registry.as_uri())
    _edit_index(registry, change)
    for command in (["list", registry.as_uri()], ["pull", f"{registry.as_uri()}/team/words@1.0.0", "--out", tmp_path]):
        result = cli(*command, ok=False)
        assert result.exit_code == 1 and f"{registry / 'index.json'}: {message}" in result.output, result.output
        assert "Traceback" not in result.output


def test_an_index_entry_may_not_reach_outside_through_a_link(tmp_path):
    registry = tmp_path / "registry"
    cli("push", write_pack(tmp_path), registry.as_uri())
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", registry / "team" / "escape")
    _edit_index(registry, lambda packs: packs["team/words"]["1.0.0"].update(file="team/escape/1.0.0.safetensors"))
    result = cli("pull", f"{registry.as_uri()}/team/words@1.0.0", "--out", tmp_path, ok=False)
    assert "points outside the registry" in result.output


def test_two_first_pushes_into_a_new_registry_both_land(tmp_path, monkeypatch):
    """The race: push B looks for index.json and finds none; push A then creates the registry and lands its pack;
    B must push into that registry, not call it a foreign folder. A runs exactly inside B's window here."""
    registry = tmp_path / "registry"
    first, second = write_pack(tmp_path, name="team/a", seed=1), write_pack(tmp_path, name="team/b", seed=2)
    looked = Path.is_file

    def is_file_then_a_lands(path: Path) -> bool:
        found = looked(path)
        if path == registry / "index.json" and not found and not getattr(is_file_then_a_lands, "done", False):
            is_file_then_a_lands.done = True
            FolderRegistry.create_or_open(RegistryRef(registry)).push(first)  # push A completes in B's window
        return found

    monkeypatch.setattr(Path, "is_file", is_file_then_a_lands)
    result = FolderRegistry.create_or_open(RegistryRef(registry)).push(second)
    monkeypatch.undo()
    assert result.status == "added" and is_file_then_a_lands.done
    assert sorted(json.loads((registry / "index.json").read_text())["packs"]) == ["team/a", "team/b"]
