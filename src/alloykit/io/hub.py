"""Hugging Face Hub names in recipes: ``org/name``, ``org/name@revision``.

A model reference that is not a local folder and looks like a Hub repository id is
resolved through ``huggingface_hub`` (the optional extra ``alloykit[hub]``):

1. the local cache first (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``; the client's layout ``models--org--name/snapshots/<commit>``
   with ``refs/<branch or tag>``), used as is when it holds the weights and config.json,
   without contacting the Hub;
2. otherwise a download of the files a merge needs (safetensors weights and index,
   config, generation config, tokenizer files; PyTorch ``.bin`` weights only for a repository
   without safetensors, and only with ``--allow-pickle``);
3. with ``HF_HUB_OFFLINE=1`` (or ``offline=True``) no download: a model missing from the
   cache is one error line naming it and the command that fetches it.

A local folder always wins over a Hub name: ``org/name`` is looked up on disk first (by the
planner), and paths that start with ``.``, ``/`` or ``~`` are never Hub names.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

from alloykit.errors import CheckpointError

log = logging.getLogger(__name__)

# a repository id (one '/', the Hub's characters), then an optional @revision (a branch, a tag,
# a commit hash, or refs/pr/N)
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,200}))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

#: what a merge reads from a model repository: weights, their index, the model and generation
#: config, the tokenizer files (every name in alloykit.vocab.files.TOKENIZER_FILES matches one of these)
MERGE_FILES = ("*.safetensors", "*.json", "*.model", "*.txt", "*.jinja")
#: PyTorch pickles, fetched only for a repository without safetensors and with --allow-pickle
PICKLE_FILES = ("pytorch_model*.bin", "adapter_model.bin")

INSTALL_HINT = "pip install 'alloykit[hub]'"


def parse_hub_name(ref: str) -> tuple[str, str | None] | None:
    """'org/name@rev' -> ('org/name', 'rev'); None when ``ref`` is not a Hub name."""
    if ref.startswith((".", "/", "~")) or "\\" in ref:
        return None
    m = _HUB_NAME.match(ref)
    if m is None or ".." in m["repo"] or "--" in m["repo"]:
        return None
    return m["repo"], m["revision"]


def is_hub_name(ref: str) -> bool:
    return parse_hub_name(ref) is not None


def cache_dir() -> Path:
    """The Hub client's cache folder, read from the environment now (not at import time)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_variable() -> str | None:
    """The variable that turns downloads off (HF_HUB_OFFLINE, or transformers' TRANSFORMERS_OFFLINE)
    when set to a true value as the Hub client reads it, else None."""
    return next((k for k in _OFFLINE_VARS if os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")), None)


def download_command(repo: str, revision: str | None, allow_pickle: bool = False) -> str:
    """The command that puts what a merge needs into the cache, for the installed client."""
    patterns = MERGE_FILES + (PICKLE_FILES if allow_pickle else ())
    rev = f" --revision {revision}" if revision else ""
    if importlib.util.find_spec("huggingface_hub.cli.hf") is not None:  # huggingface_hub >= 0.34: 'hf'
        return f"hf download {repo}{rev} " + " ".join(f"--include '{p}'" for p in patterns)
    return f"huggingface-cli download {repo}{rev} --include " + " ".join(f"'{p}'" for p in patterns)


def missing_files(folder: Path, allow_pickle: bool) -> list[str]:
    """What a merge needs that ``folder`` lacks: config.json (or adapter_config.json) and the
    weights (every shard its index names); [] when it is complete."""
    missing = []
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        missing.append("config.json")
    index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return missing + [index.name + " (unreadable)"]
        return missing + [s for s in shards if not (folder / str(s)).is_file()]
    weights = [p.name for p in folder.glob("*.safetensors")]
    if allow_pickle:
        weights += [p.name for pat in PICKLE_FILES for p in folder.glob(pat)]
    return missing + ([] if weights else ["*.safetensors weights"])


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def locate(ref: str, recipe_dir: Path | None = None, *, allow_pickle: bool = False) -> Path:
    """Where a recipe's model reference lives: a local path (from the working directory, then
    the recipe's folder), else a Hub name resolved to its snapshot (``resolve``), else the path
    as written (the caller's error names it). The one lookup of merge and merge-lora recipes."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if recipe_dir is not None and not p.is_absolute() and (Path(recipe_dir) / p).exists():
        return Path(recipe_dir) / p
    if is_hub_name(ref):
        return resolve(ref, allow_pickle=allow_pickle)
    return p


def resolve(ref: str, *, allow_pickle: bool = False, offline: bool | None = None) -> Path:
    """The local folder holding Hub model ``ref`` ('org/name' or 'org/name@revision'),
    from the cache or, when allowed, downloaded into it. Raises CheckpointError (one line)."""
    parsed = parse_hub_name(ref)
    if parsed is None:
        raise CheckpointError(f"model '{ref}': not a local folder and not a Hub name (org/name or org/name@revision)")
    repo, revision = parsed
    why_offline = offline_variable() if offline is None else ("offline=True" if offline else None)
    hub = _hub()
    if hub is None:
        raise CheckpointError(
            f"model '{ref}' is not a local folder; reading it from the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}"
        )
    cache = cache_dir()
    folder = _cached_snapshot(hub, repo, revision, cache)
    if folder is not None and not missing_files(folder, allow_pickle):
        log.debug("model %s: cached snapshot %s", ref, folder)
        return folder
    fetch = download_command(repo, revision, allow_pickle)
    if why_offline:
        what = (f"its cached snapshot lacks {', '.join(missing_files(folder, allow_pickle)[:3])}" if folder is not None
                else f"it is not in the Hugging Face cache ({cache})")
        setting = why_offline if "=" in why_offline else f"{why_offline}=1"
        raise CheckpointError(f"model '{ref}' is not a local folder and {what}; {setting} forbids downloading it: "
                              f"fetch it with: {fetch}")
    return _download(hub, ref, repo, revision, cache, allow_pickle, fetch)


def _cached_snapshot(hub, repo: str, revision: str | None, cache: Path) -> Path | None:
    try:
        path = hub.snapshot_download(repo, revision=revision, cache_dir=str(cache), local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or a snapshot the client knows is incomplete
        return None
    return Path(path)


def _download(hub, ref: str, repo: str, revision: str | None, cache: Path, allow_pickle: bool, fetch: str) -> Path:
    errors = hub.errors if hasattr(hub, "errors") else hub.utils
    try:
        files = hub.HfApi().list_repo_files(repo, revision=revision)
        patterns = list(MERGE_FILES)
        if not any(f.endswith(".safetensors") for f in files):
            pickles = [f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLE_FILES)]
            if pickles and not allow_pickle:
                raise CheckpointError(
                    f"model '{ref}' on the Hub has only pickle weights ({pickles[0]}); pickle can run code, so it is refused "
                    "by default: pass --allow-pickle (loads with weights_only=True)"
                )
            patterns += PICKLE_FILES
        log.info("model %s: downloading %s into %s", ref, ", ".join(patterns), cache)
        path = Path(hub.snapshot_download(repo, revision=revision, cache_dir=str(cache), allow_patterns=patterns))
    except CheckpointError:
        raise
    except getattr(errors, "RevisionNotFoundError", ()) as err:
        raise CheckpointError(f"model '{ref}': the Hub repository {repo} has no revision '{revision}' ({_first_line(err)})") from None
    except getattr(errors, "GatedRepoError", ()) as err:
        raise CheckpointError(f"model '{ref}': the Hub repository {repo} is gated; accept its terms on huggingface.co and "
                              f"log in with 'hf auth login' ({_first_line(err)})") from None
    except getattr(errors, "RepositoryNotFoundError", ()) as err:
        raise CheckpointError(f"model '{ref}': no local folder of that name, and no Hub repository {repo} "
                              f"(or it is private: log in with 'hf auth login') ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - network failures come in many types (OSError, httpx, requests)
        raise CheckpointError(f"model '{ref}' is not in the cache and downloading it failed ({type(err).__name__}: "
                              f"{_first_line(err)}); fetch it with: {fetch}") from None
    still = missing_files(path, allow_pickle)
    if still:
        raise CheckpointError(f"model '{ref}': the Hub repository has no {', '.join(still[:3])}; it is not a model alloykit can merge")
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
