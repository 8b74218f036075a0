"""Models by Hub id through huggingface_hub's real code paths: a local Hub (``hub_server.FakeHub``, via
``HF_ENDPOINT``) serves the bundled MiniLM and SmolLM2 under Hub ids; ``slicelm download`` (a subprocess, since
huggingface_hub reads HF_HUB_OFFLINE at import) lays out the cache with ``snapshot_download``; offline look-ups run
here. Every error the issue lists has a test naming its message."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_models import (
    MINILM_ID,
    ROOT,
    SMOLLM_ID,
    SMOLLM_Q4,
    SMOLLM_Q8,
    add_minilm,
    add_sharded_minilm,
    add_smollm_gguf,
    hub_env,
    slicelm,
)
from hub_server import FakeHub

from slicelm.loader import hub as hub_mod
from slicelm.loader.errors import HubError, ModelNotCachedError
from slicelm.loader.hub import HubOptions
from slicelm.loader.model_files import resolve_model


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hub")
    with FakeHub() as h:
        h.commits = dict(zip(("main", "v1"), add_minilm(h)))
        h.commits["gguf"] = add_smollm_gguf(h)
        h.commits["sharded"] = add_sharded_minilm(h, tmp)
        h.add("org/gated", {"config.json": b"{}", "model.safetensors": b"x"}, access="gated")
        h.add("org/private", {"config.json": b"{}"}, access="private")
        h.add("org/bin-only", {"config.json": b"{}", "pytorch_model.bin": b"x", "tf_model.h5": b"y",
                               "README.md": b"#"})
        yield h


@pytest.fixture(scope="module")
def home(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME filled by `slicelm download` from the local Hub: MiniLM at main and at v1, SmolLM2's Q4_1."""
    home = tmp_path_factory.mktemp("hf-home")
    env = hub_env(hub, home, offline=False)
    for args in ([MINILM_ID], [MINILM_ID, "--revision", "v1"], [f"{SMOLLM_ID}:Q4_1"], ["org/minilm-sharded"]):
        r = slicelm("download", *args, env=env)
        assert r.returncode == 0, r.stderr
    return home


@pytest.fixture
def offline(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home / "hub"


def test_download_lays_out_the_cache_like_huggingface_hub(hub: FakeHub, home: Path) -> None:
    repo = home / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    assert (repo / "refs" / "main").read_text() == hub.commits["main"]
    assert (repo / "refs" / "v1").read_text() == hub.commits["v1"]
    snap = repo / "snapshots" / hub.commits["main"]
    assert (snap / "model.safetensors").is_symlink() and (snap / "1_Pooling" / "config.json").is_file()
    fetched = set(hub.downloads(MINILM_ID))
    assert {"model.safetensors", "tokenizer.json", "config.json", "modules.json"} <= fetched
    assert not fetched & {"pytorch_model.bin", "onnx/model.onnx", "original/consolidated.safetensors",
                          "original/params.json"}, "only what slicelm loads is downloaded"


def test_revision_pin_picks_the_snapshot(hub: FakeHub, offline: Path) -> None:
    for revision, commit, length in ((None, hub.commits["main"], 256), ("v1", hub.commits["v1"], 128),
                                     (hub.commits["v1"], hub.commits["v1"], 128)):
        source = resolve_model(MINILM_ID, hub=HubOptions(revision=revision))
        assert source.path == offline / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / commit
        assert source.max_seq_length == length


def test_gguf_quant_and_index_shards(hub: FakeHub, offline: Path) -> None:
    source = resolve_model(f"{SMOLLM_ID}:Q4_1")
    assert source.kind == "gguf" and source.path.name == SMOLLM_Q4
    assert source.config["architectures"] == ["LlamaForCausalLM"]
    assert hub.downloads(SMOLLM_ID) == [SMOLLM_Q4], "README and the other quantization are not fetched"
    assert hub_mod.fetch(SMOLLM_ID).model_path.name == SMOLLM_Q4  # the only cached GGUF
    sharded = resolve_model("org/minilm-sharded")
    assert [f.name for f in sharded.weight_files] == ["model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"]
    assert "model-00003-of-00003.safetensors" not in hub.downloads("org/minilm-sharded")
    with pytest.raises(HubError, match=r"has no Q5_K_M GGUF file \(it has Q4_1, Q8_0\)"):
        hub_mod.pick_gguf(SMOLLM_ID, "Q5_K_M", [SMOLLM_Q4, SMOLLM_Q8])
    with pytest.raises(HubError, match=r"several GGUF files: name one quantization as .*:QUANT"):
        hub_mod.pick_gguf(SMOLLM_ID, None, [SMOLLM_Q4, SMOLLM_Q8])
    assert hub_mod.pick_gguf("o/r", "q4_k", ["m-Q4_K_M.gguf", "m-Q4_K.gguf"]) == "m-Q4_K.gguf"


def test_names_resolve_in_vllms_order(tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub_mod.split_name("unsloth/Qwen3-0.6B-GGUF:Q4_K_M") == ("unsloth/Qwen3-0.6B-GGUF", "Q4_K_M")
    assert hub_mod.is_hub_id("BAAI/bge-m3") and hub_mod.is_hub_id("gpt2") and hub_mod.is_hub_id("o/r:Q8_0")
    assert not any(hub_mod.is_hub_id(n) for n in ("./BAAI/bge-m3", "/models/x", "a/b/c", "m.gguf", "~/m"))
    local = tmp_path / "sentence-transformers" / "all-MiniLM-L6-v2"  # an existing path wins over the Hub id
    local.parent.mkdir()
    local.symlink_to(resolve_model(MINILM_ID).path)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(MINILM_ID).path == Path(MINILM_ID)
    assert resolve_model("all-minilm-l6-v2").path.name == "model"  # a bundled short name, not a Hub id


def test_not_cached_offline_says_where_it_looked_and_how_to_prefetch(offline: Path) -> None:
    with pytest.raises(ModelNotCachedError) as e:
        resolve_model("org/never-fetched", hub=HubOptions(revision="v2"))
    msg = str(e.value)
    assert "'org/never-fetched' at revision 'v2' is not in the cache" in msg
    assert str(offline / "models--org--never-fetched") in msg
    assert "slicelm download org/never-fetched --revision v2" in msg
    from slicelm import LLM

    with pytest.raises(ModelNotCachedError, match="org/never-fetched"):  # the Python API: a typed exception
        LLM("org/never-fetched")


def test_cli_exit_code_2_and_code_revision_refused(home: Path) -> None:
    r = slicelm("download", "org/never-fetched", env=hub_env(None, home, offline=True), timeout=60)
    assert r.returncode == 2 and "slicelm download: error: model 'org/never-fetched'" in r.stderr
    from slicelm.config import EngineArgs

    with pytest.raises(ValueError, match="--code-revision"):
        EngineArgs(model=MINILM_ID, code_revision="abc")


ERRORS_SCRIPT = textwrap.dedent("""
    import json, sys
    from slicelm.loader.hub import HubOptions, fetch
    cases = {"gated": ("org/gated", HubOptions()), "gated_bad_token": ("org/gated", HubOptions(token="hf_wrong")),
             "gated_ok": ("org/gated", HubOptions(token="hf_valid_token")), "private": ("org/private", HubOptions()),
             "missing": ("org/missing", HubOptions()), "revision": (sys.argv[1], HubOptions(revision="v9")),
             "bin_only": ("org/bin-only", HubOptions())}
    out = {}
    for name, (repo, opts) in cases.items():
        try:
            out[name] = ["ok", str(fetch(repo, opts).path)]
        except Exception as e:
            out[name] = [type(e).__name__, str(e)]
    print(json.dumps(out))
""")


def test_hub_errors_name_the_id_and_the_fix(hub: FakeHub, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", ERRORS_SCRIPT, MINILM_ID], capture_output=True, text=True, cwd=ROOT,
                       env=hub_env(hub, tmp_path, offline=False), timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["gated"][0] == "HubAccessError" and "'org/gated' is gated" in out["gated"][1]
    assert "(HTTP 401): set HF_TOKEN (or pass --hf-token)" in out["gated"][1]
    assert out["gated_bad_token"][0] == "HubAccessError" and "(HTTP 403)" in out["gated_bad_token"][1]
    assert "the token given cannot read it" in out["gated_bad_token"][1]
    assert out["gated_ok"][0] == "ok"
    assert out["private"][0] == "HubRepoNotFoundError"
    assert "'org/private' was not found" in out["private"][1] and "set HF_TOKEN" in out["private"][1]
    assert out["missing"][0] == "HubRepoNotFoundError" and "'org/missing' was not found" in out["missing"][1]
    assert out["revision"] == ["HubRevisionNotFoundError", f"model '{MINILM_ID}' has no revision 'v9' on {hub.url}: "
                               f"give a branch, tag or commit of {hub.url}/{MINILM_ID}"]
    assert out["bin_only"][0] == "NoSafetensorsError"
    assert "'org/bin-only' has no *.safetensors weights" in out["bin_only"][1]
    assert "the repo has: pytorch_model.bin, tf_model.h5" in out["bin_only"][1]


def test_unreachable_hub_falls_back_to_the_cache(home: Path, hub: FakeHub) -> None:
    env = hub_env(None, home, offline=False, HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9
    r = slicelm("download", MINILM_ID, env=env, timeout=120)
    assert r.returncode == 0 and hub.commits["main"] in r.stdout, r.stderr
    assert "the Hub is unreachable" in r.stderr
    r = slicelm("download", "org/never-fetched", env=env, timeout=120)
    assert r.returncode == 2 and "is not in the cache" in r.stderr


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # MiniLM's weights are 90 MB


def test_disk_full_leaves_nothing_half_written(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    r = slicelm("download", MINILM_ID, "--download-dir", str(cache), env=hub_env(hub, tmp_path, offline=False),
                timeout=120, preexec_fn=_limit_file_size)
    assert r.returncode == 2, r.stderr
    assert "the disk filled up while downloading" in r.stderr and "the partial download was removed" in r.stderr
    repo = cache / "models--sentence-transformers--all-MiniLM-L6-v2"
    assert not list((repo / "snapshots").iterdir()) and not list((repo / "blobs").glob("*.incomplete"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotCachedError):
        hub_mod.fetch(MINILM_ID, HubOptions(download_dir=str(cache)))


def test_two_processes_download_one_snapshot_once(hub: FakeHub, tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path, offline=False)
    before = len(hub.downloads("org/minilm-sharded"))
    procs = [subprocess.Popen([sys.executable, "-m", "slicelm.entrypoints.cli", "download", "org/minilm-sharded",
                               "--download-dir", str(tmp_path / "shared-cache")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = hub.downloads("org/minilm-sharded")[before:]
    assert sorted(got) == sorted(set(got)) and "model-00001-of-00002.safetensors" in got  # each file once
    assert outs[0][0].split(": ", 1)[1] == outs[1][0].split(": ", 1)[1]  # one snapshot


def test_modelscope_only_when_asked(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_mod.fetch(MINILM_ID)
    assert "modelscope" not in sys.modules
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "True")
    try:
        import modelscope  # noqa: F401
    except ImportError:
        with pytest.raises(HubError, match=r"modelscope is not installed; run `pip install 'slicelm\[modelscope\]'`"):
            hub_mod.fetch("Qwen/Qwen2.5-0.5B-Instruct")
    else:
        pytest.skip("modelscope is installed here: its real download is not tested offline")
