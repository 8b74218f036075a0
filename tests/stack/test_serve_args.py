"""modelSpec -> `slicelm serve` flags: each vllmConfig key reaches its flag; the CLI stays torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from slicelm.stack.serve_args import serve_command, served_model_names
from slicelm.stack.serve_flags import SERVE_FLAGS
from slicelm.stack.spec import parse_stack

ROOT = Path(__file__).resolve().parents[2]


def model(**kw):
    return parse_stack({"servingEngineSpec": {"modelSpec": [{"name": "m", "modelURL": "/models/x", **kw}]}}).models()[0]


def test_serve_flags_match_the_real_parser() -> None:
    from slicelm.entrypoints.cli import make_parser

    parser = make_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    real = {o for a in serve._actions for o in a.option_strings if o.startswith("--")}
    assert real == SERVE_FLAGS, "update SERVE_FLAGS in slicelm/stack/serve_flags.py"


def test_vllm_config_reaches_its_flags() -> None:
    m = model(vllmConfig={"dtype": "bfloat16", "maxModelLen": 4096, "maxNumSeqs": 32, "enablePrefixCaching": True,
                          "runner": "pooling", "convert": "classify", "extraArgs": ["--block-size", "32"]},
              chatTemplate="/t.jinja")
    cmd = serve_command(m, "127.0.0.1", 9000, "cuda", None)
    assert cmd[cmd.index("serve") + 1] == "/models/x"
    joined = " ".join(cmd)
    for part in ("--host 127.0.0.1", "--port 9000", "--device cuda", "--served-model-name /models/x",
                 "--enable-prefix-caching", "--max-model-len 4096", "--dtype bfloat16", "--max-num-seqs 32",
                 "--runner pooling", "--task score", "--chat-template /t.jinja", "--block-size 32"):
        assert part in joined, part
    assert "--gpu-memory-budget" not in joined


def test_prefix_caching_off_when_vllm_config_omits_it_as_the_chart_does() -> None:
    assert "--no-enable-prefix-caching" in serve_command(model(vllmConfig={"maxNumSeqs": 4}), "h", 1, "cpu", None)
    assert "prefix" not in " ".join(serve_command(model(), "h", 1, "cpu", None))


def test_memory_slice_becomes_the_budget_scaled_by_utilization() -> None:
    cmd = serve_command(model(vllmConfig={"gpuMemoryUtilization": 0.85}), "h", 1, "cuda", 14000)
    assert cmd[cmd.index("--gpu-memory-budget") + 1] == "11900MiB"
    assert "--gpu-memory-utilization" not in cmd
    whole = serve_command(model(vllmConfig={"gpuMemoryUtilization": 0.8}), "h", 1, "cuda", None)
    assert whole[whole.index("--gpu-memory-utilization") + 1] == "0.8"
    cpu = serve_command(model(vllmConfig={"gpuMemoryUtilization": 0.8}), "h", 1, "cpu", 14000)
    assert "--gpu-memory-budget" not in cpu


def test_served_name_is_model_url_unless_named() -> None:
    assert served_model_names(model()) == ["/models/x"]
    named = model(vllmConfig={"extraArgs": ["--served-model-name", "chat", "alias", "--max-num-seqs", "4"]})
    assert served_model_names(named) == ["chat", "alias"]
    assert serve_command(named, "h", 1, "cpu", None).count("--served-model-name") == 1


def test_plan_ps_down_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from slicelm.entrypoints.cli import main\n"
        f"assert main(['plan', {str(ROOT / 'examples/stacks/cpu-rag.yaml')!r}, '--format', 'json']) == 0\n"
        f"assert main(['ps', '--run-dir', {str(tmp_path)!r}]) == 0\n"
        f"assert main(['down', '--run-dir', {str(tmp_path)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"placements"' in r.stdout and "no stack in" in r.stdout


def test_tool_and_structured_output_flags_pass_in_extra_args_and_model_spec() -> None:
    from slicelm.stack.serve_flags import check_extra_args

    extra = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
             '--structured-outputs-config={"backend": "guidance"}', "--exclude-tools-when-tool-choice-none"]
    assert check_extra_args(extra, "m") == []
    cmd = serve_command(model(vllmConfig={"extraArgs": extra}), "h", 1, "cpu", None)
    assert cmd[-len(extra):] == extra
    chart_style = serve_command(model(enableTool=True, toolCallParser="llama3_json"), "h", 1, "cpu", None)
    assert " --enable-auto-tool-choice --tool-call-parser llama3_json" in " ".join(chart_style)
    assert check_extra_args(["--tool-call-parsr", "x"], "m") == ["m.vllmConfig.extraArgs[0]: --tool-call-parsr is not "
                                                                 "a slicelm serve flag"]
