"""The chart and models by Hub id: HF_HOME on the model-cache PVC, production-stack's ``hf_token`` (a string, kept
in the release's Secret, or an existing Secret's name/key) passed as HF_TOKEN, as production-stack renders it."""

from __future__ import annotations

import base64

import yaml
from helm_utils import SHARED_EXAMPLES, find, render

BASIC = SHARED_EXAMPLES / "production-stack-values-02-basic-config.yaml"
SEED = SHARED_EXAMPLES / "seed-hami-rag.yaml"


def env_of(deployment: dict) -> dict[str, dict]:
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_hf_token_string_goes_through_the_release_secret() -> None:
    docs = render(BASIC)
    token = yaml.safe_load(BASIC.read_text())["servingEngineSpec"]["modelSpec"][0]["hf_token"]
    secret = find(docs, "Secret", "rel-secrets")
    assert base64.b64decode(secret["data"]["hf_token_llama3"]).decode() == token
    env = env_of(find(docs, "Deployment", "rel-llama3-deployment-vllm"))
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rel-secrets", "key": "hf_token_llama3"}
    assert env["HF_HOME"]["value"] == "/data"  # pvcStorage: the Hub cache lives on the model-cache PVC


def test_hf_token_secret_reference_and_no_token(tmp_path) -> None:
    values = yaml.safe_load(BASIC.read_text())
    values["servingEngineSpec"]["modelSpec"][0]["hf_token"] = {"secretName": "hub", "secretKey": "token"}
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    docs = render(path)
    env = env_of(find(docs, "Deployment", "rel-llama3-deployment-vllm"))
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hub", "key": "token"}
    assert not [d for d in docs if d["kind"] == "Secret"]  # nothing to keep: no release Secret
    seed = render(SEED)
    for name in ("rel-bge-m3-embed-deployment-vllm", "rel-bge-reranker-v2-m3-deployment-vllm"):
        dep = find(seed, "Deployment", name)
        env = env_of(dep)
        assert "HF_TOKEN" not in env and env["HF_HOME"]["value"] == "/data"
        mounts = dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "model-cache", "mountPath": "/data"} in mounts
