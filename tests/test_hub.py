"""Hub names in recipes (org/name, org/name@revision, base+adapter), resolved offline.

Every test works on a Hub cache folder written as the Hub client writes it (blobs,
symlinked snapshots, refs), checked first with the client's own readers. No test reaches
the network: sockets are refused for the whole module, and the download path is driven
through a stand-in for the Hub API that records what was asked for.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import alloykit
from alloykit.cli.main import main
from alloykit.errors import CheckpointError
from alloykit.io import hub
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import read_state
from alloykit.testing.hubcache import add_snapshot, refuse_network, repo_folder

huggingface_hub = pytest.importorskip("huggingface_hub")

SHAPE = LlamaShape(vocab=64, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2)


@pytest.fixture(autouse=True)
def no_network():
    with refuse_network():
        yield


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubsrc")
    base, tunes = write_family(root, 3, SHAPE, shard_bytes=20_000, delta_scale=0.5)
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return base, tunes


@pytest.fixture
def cache(tmp_path, local, monkeypatch):
    """acme/tiny-base (main), acme/tiny-ft1 (main), acme/tiny-ft2 at main = ft2 and tag v1 = ft3."""
    c = tmp_path / "hf" / "hub"
    base, (ft1, ft2, ft3) = local
    add_snapshot(c, "acme/tiny-base", base)
    add_snapshot(c, "acme/tiny-ft1", ft1)
    add_snapshot(c, "acme/tiny-ft2", ft2)
    add_snapshot(c, "acme/tiny-ft2", ft3, refs=("v1",))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c



def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- the prepared cache is what the Hub client reads -------------------------------------------


def test_prepared_cache_is_read_by_the_hub_client(cache, local):
    base, (_, ft2, ft3) = local
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    snap = Path(snapshot_download("acme/tiny-base", cache_dir=str(cache), local_files_only=True))
    assert snap.parent.name == "snapshots" and (snap / "config.json").is_symlink()
    assert sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in base.iterdir())
    got = try_to_load_from_cache("acme/tiny-ft2", "model.safetensors.index.json", cache_dir=str(cache), revision="v1")
    assert isinstance(got, str) and Path(got).read_bytes() == (ft3 / "model.safetensors.index.json").read_bytes()
    got = try_to_load_from_cache("acme/tiny-ft2", "model.safetensors.index.json", cache_dir=str(cache))
    assert Path(got).read_bytes() == (ft2 / "model.safetensors.index.json").read_bytes()


# ---- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref, want", [
    ("acme/tiny-base", ("acme/tiny-base", None)),
    ("acme/tiny-ft2@v1", ("acme/tiny-ft2", "v1")),
    ("meta-llama/Llama-3.2-1B@refs/pr/3", ("meta-llama/Llama-3.2-1B", "refs/pr/3")),
    ("Org.Name/model_v1.5@" + "a" * 40, ("Org.Name/model_v1.5", "a" * 40)),
    ("./acme/tiny", None), ("/abs/path", None), ("~/models/x", None), ("a/b/c", None), ("plain", None),
    ("acme/x+acme/lora", None), ("acme/../x", None), ("acme/a--b", None), ("acme/x@", None),
])
def test_hub_name_grammar(ref, want):
    assert hub.parse_hub_name(ref) == want


def test_merge_files_cover_every_tokenizer_file():
    from alloykit.vocab.files import PROCESSOR_FILES, TOKENIZER_FILES

    needed = list(TOKENIZER_FILES + PROCESSOR_FILES) + ["config.json", "generation_config.json", "model.safetensors",
                                      "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                                      "adapter_config.json", "adapter_model.safetensors"]
    for name in needed:
        assert any(fnmatch.fnmatch(name, p) for p in hub.MERGE_FILES), name
    for name in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "adapter_model.bin", "training_args.bin"):
        assert not any(fnmatch.fnmatch(name, p) for p in hub.MERGE_FILES), name


# ---- merges read Hub names from the cache --------------------------------------------------------


def test_hub_names_merge_like_local_folders(cache, local, tmp_path):
    base, (ft1, ft2, ft3) = local
    params = {"weight": 0.5, "density": 0.6}
    hub_recipe = {"merge_method": "ties", "base_model": "acme/tiny-base",
                  "models": [{"model": "acme/tiny-ft1", "parameters": params},
                             {"model": "acme/tiny-ft2", "parameters": params},
                             {"model": "acme/tiny-ft2@v1", "parameters": params}]}
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(hub_recipe))
    assert main(["merge", str(path), str(tmp_path / "from_hub"), "--quiet"]) == 0
    local_recipe = {**hub_recipe, "base_model": str(base),
                    "models": [{"model": str(m), "parameters": params} for m in (ft1, ft2, ft3)]}
    alloykit.merge(local_recipe, tmp_path / "from_disk", progress=False)
    assert_same_tensors(read_state(tmp_path / "from_hub"), read_state(tmp_path / "from_disk"))
    out = tmp_path / "from_hub"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77  # from the base's snapshot
    labels = [i["ref"] for i in json.loads((out / "alloykit_manifest.json").read_text())["inputs"]]
    assert labels == ["acme/tiny-base", "acme/tiny-ft1", "acme/tiny-ft2", "acme/tiny-ft2@v1"]


def test_inspect_reads_a_hub_name(cache, local, capsys):
    assert main(["inspect", "acme/tiny-ft2@v1"]) == 0
    out = capsys.readouterr().out
    assert "model: acme/tiny-ft2@v1" in out and f"{sum(t.numel() for t in read_state(local[1][2]).values()):,}" in out


def test_revision_by_commit_hash(cache, local, tmp_path):
    base, (_, _, ft3) = local
    commit = (repo_folder(cache, "acme/tiny-ft2") / "refs" / "v1").read_text()
    recipe = {"merge_method": "linear", "models": [{"model": f"acme/tiny-ft2@{commit}", "parameters": {"weight": 1.0}}]}
    assert_same_tensors(read_state(alloykit.merge(recipe, tmp_path / "o", progress=False)), read_state(ft3))


def test_local_folder_wins_over_hub_name(cache, local, tmp_path):
    base, (ft1, ft2, _) = local
    shutil.copytree(ft2, tmp_path / "acme" / "tiny-ft1")  # a local folder spelled like the Hub repo
    recipe = {"merge_method": "linear", "models": [{"model": "acme/tiny-ft1", "parameters": {"weight": 1.0}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = alloykit.merge(tmp_path / "r.yaml", tmp_path / "o", progress=False)  # relative to the recipe's folder
    assert_same_tensors(read_state(out), read_state(ft2))


def test_base_plus_adapter_with_hub_names(cache, local, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, _ = local
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/tiny-base"  # as an adapter trained from the Hub names its base
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    add_snapshot(cache, "acme/tiny-lora", tmp_path / "adapter")
    folded = {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}]}
    want = read_state(alloykit.merge(folded, tmp_path / "want", progress=False))
    assert any(not torch.equal(want[k], v) for k, v in read_state(base).items())  # the adapter changed something
    for ref in ("acme/tiny-base+acme/tiny-lora", "acme/tiny-lora"):  # explicit, and the adapter naming its Hub base
        recipe = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
        assert_same_tensors(read_state(alloykit.merge(recipe, tmp_path / ref.replace("/", "_"), progress=False)), want)


def test_merge_lora_reads_hub_names_through_the_planners_lookup(cache, local, tmp_path):
    """merge-lora's base and adapters are found as merge recipes' models are: the local cache of
    Hub names (a recipe file's relative paths too), equal to the same merge from local folders."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from alloykit.lora.merge import merge_adapters

    base, _ = local
    for i, targets in ((1, ["q_proj", "up_proj"]), (2, ["q_proj", "v_proj"])):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(tmp_path / f"a{i}")
        add_snapshot(cache, f"acme/tiny-lora{i}", tmp_path / f"a{i}")
    merge_adapters([tmp_path / "a1", tmp_path / "a2"], base, tmp_path / "want", method="ties", rank=8, weights=[1.0, 0.5])
    want = read_state(tmp_path / "want")
    assert any("up_proj" in k for k in want) and any("v_proj" in k for k in want)  # both adapters' modules
    merge_adapters(["acme/tiny-lora1", "acme/tiny-lora2@main"], "acme/tiny-base", tmp_path / "hub", method="ties",
                   rank=8, weights=[1.0, 0.5])
    assert_same_tensors(read_state(tmp_path / "hub"), want)
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"merge_lora": {"base": "acme/tiny-base", "adapters": ["acme/tiny-lora1", "acme/tiny-lora2"],
                                                     "method": "ties", "rank": 8, "weights": [1.0, 0.5]}}))
    assert main(["merge-lora", "--recipe", str(recipe), str(tmp_path / "cli")]) == 0
    assert_same_tensors(read_state(tmp_path / "cli"), want)
    with pytest.raises(CheckpointError, match="'acme/tiny-lora3' is not a local folder.*HF_HUB_OFFLINE=1.*download"):
        merge_adapters(["acme/tiny-lora1", "acme/tiny-lora3"], "acme/tiny-base", tmp_path / "none", method="cat")
    assert not (tmp_path / "none").exists()


def test_moe_config_reads_hub_names(cache, local, tmp_path):
    """mergekit-moe configs name Hub models: alloykit moe finds them as a merge recipe does."""
    from alloykit.moe.build import build_moe

    base, (ft1, ft2, _) = local

    def config(b, experts):
        return {"base_model": str(b), "gate_mode": "random", "dtype": "float32",
                "experts": [{"source_model": str(e), "positive_prompts": ["x"]} for e in experts]}

    want = read_state(build_moe(config(base, [ft1, ft2]), tmp_path / "want", progress=False))
    got = read_state(build_moe(config("acme/tiny-base", ["acme/tiny-ft1", "acme/tiny-ft2@main"]), tmp_path / "hub",
                               progress=False))
    assert_same_tensors(got, want)
    with pytest.raises(CheckpointError, match="moe config: .*'acme/nothing' is not a local folder.*HF_HUB_OFFLINE=1"):
        build_moe(config("acme/tiny-base", ["acme/tiny-ft1", "acme/nothing"]), tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


# ---- offline: one line naming the model and the command that fetches it -------------------------


def test_offline_missing_model_is_one_line_with_the_fetch_command(cache, local, tmp_path, capsys):
    recipe = {"merge_method": "linear", "models": [{"model": "acme/tiny-ft1", "parameters": {"weight": 1.0}},
                                                   {"model": "acme/not-cached@v2", "parameters": {"weight": 1.0}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "'acme/not-cached@v2'" in err and "HF_HUB_OFFLINE=1" in err
    assert "hf download acme/not-cached --revision v2 --include '*.safetensors'" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_offline_partial_snapshot_names_the_missing_shard(cache, local, tmp_path):
    _, (ft1, _, _) = local
    shard = sorted(ft1.glob("model-*.safetensors"))[1].name
    add_snapshot(cache, "acme/partial", ft1, skip=(shard,))
    with pytest.raises(CheckpointError, match=rf"'acme/partial'.*lacks {shard}.*fetch it with: .*download acme/partial"):
        hub.resolve("acme/partial")


def test_fetch_command_matches_the_installed_client():
    cmd = hub.download_command("org/x", "v1")
    import importlib.util

    if importlib.util.find_spec("huggingface_hub.cli.hf"):
        assert cmd.startswith("hf download org/x --revision v1 --include '*.safetensors' --include '*.json'")
    else:
        assert cmd.startswith("huggingface-cli download org/x --revision v1 --include '*.safetensors' '*.json'")
    assert "bin" not in cmd and "pytorch_model*.bin" in hub.download_command("org/x", None, allow_pickle=True)


def test_missing_huggingface_hub_names_the_extra(cache, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match=r"pip install 'alloykit\[hub\]'"):
        hub.resolve("acme/tiny-ft1")


# ---- online: only the files a merge needs ---------------------------------------------------------


class FakeHub:
    """Stands in for the Hub API: lists a repository's files and 'downloads' them into the cache
    from a local folder, recording the patterns asked for."""

    real_snapshot_download = staticmethod(huggingface_hub.snapshot_download)

    def __init__(self, cache: Path, repos: dict[str, tuple[Path, list[str]]]):
        self.cache, self.repos, self.asked = cache, repos, []

    def list_repo_files(self, repo, revision=None):
        if repo not in self.repos:
            cls = huggingface_hub.errors.RepositoryNotFoundError
            err = cls.__new__(cls)  # built without an HTTP response object (its type varies by version)
            Exception.__init__(err, f"404 Client Error: Repository Not Found for url: https://huggingface.co/api/models/{repo}")
            raise err
        return self.repos[repo][1]

    def snapshot_download(self, repo, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            return self.real_snapshot_download(repo, revision=revision, cache_dir=cache_dir, local_files_only=True)
        self.asked.append((repo, list(allow_patterns)))
        src, files = self.repos[repo]
        skip = tuple(f for f in files if not any(fnmatch.fnmatch(f, p) for p in allow_patterns))
        add_snapshot(cache_dir, repo, src, skip=skip)
        return self.real_snapshot_download(repo, cache_dir=cache_dir, local_files_only=True)


@pytest.fixture
def online(cache, local, monkeypatch, tmp_path):
    base, (ft1, _, _) = local
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(ft1 / "config.json", pickled)
    sd = read_state(ft1)
    torch.save(sd, pickled / "pytorch_model.bin")
    torch.save({"lr": torch.tensor(0.1)}, pickled / "training_args.bin")
    both = tmp_path / "both"
    shutil.copytree(ft1, both)
    torch.save(sd, both / "pytorch_model.bin")
    files = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    fake = FakeHub(cache, {"acme/online": (both, files(both) + ["README.md", "onnx/model.onnx"]),
                           "acme/pickled": (pickled, files(pickled))})
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    return fake


def test_download_fetches_only_what_a_merge_needs(online, local, tmp_path):
    _, (ft1, _, _) = local
    recipe = {"merge_method": "linear", "models": [{"model": "acme/online", "parameters": {"weight": 1.0}}]}
    out = alloykit.merge(recipe, tmp_path / "o", progress=False)
    assert_same_tensors(read_state(out), read_state(ft1))
    [(repo, patterns)] = online.asked
    assert repo == "acme/online" and patterns == list(hub.MERGE_FILES)
    snap = hub.resolve("acme/online")  # now cached: no second download
    assert len(online.asked) == 1
    assert not (snap / "pytorch_model.bin").exists() and (snap / "model.safetensors.index.json").exists()


def test_cached_model_is_used_without_asking_the_hub(online, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": "acme/tiny-ft1", "parameters": {"weight": 1.0}}]}
    alloykit.merge(recipe, tmp_path / "o", progress=False)
    assert online.asked == []


def test_pickle_only_repository_needs_allow_pickle(online, local, tmp_path):
    _, (ft1, _, _) = local
    recipe = {"merge_method": "linear", "models": [{"model": "acme/pickled", "parameters": {"weight": 1.0}}]}
    with pytest.raises(CheckpointError, match=r"'acme/pickled'.*only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        alloykit.merge(recipe, tmp_path / "o", progress=False)
    assert online.asked == [] and not (tmp_path / "o").exists()
    out = alloykit.merge(recipe, tmp_path / "o", progress=False, allow_pickle=True)
    assert_same_tensors(read_state(out), read_state(ft1))
    [(_, patterns)] = online.asked
    assert "pytorch_model*.bin" in patterns and "*.bin" not in patterns  # never training_args.bin


def test_unknown_repository_is_one_line(online, tmp_path):
    with pytest.raises(CheckpointError, match=r"model 'acme/nope': no local folder of that name, and no Hub repository acme/nope"):
        hub.resolve("acme/nope")
