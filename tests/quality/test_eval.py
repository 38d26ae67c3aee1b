"""``ensemble-ops eval`` on a GGUF file: a table or JSON, and the exit code of its verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ensemble_ops.cli.main import main


def test_a_random_weights_file_fails_the_shipped_chat_set(
    demo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """demo-base has a chat template, so it gets the chat set, and random weights answer
    none of it: exit 1, every case in the JSON with what it said."""
    code = main(["eval", "--file", str(demo_dir / "demo-base.gguf"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    assert result["verdict"] == "fail"
    assert result["golden_set"].endswith("chat.jsonl")
    assert result["cases"] == len(result["results"]) == 20
    assert result["pass_rate"] < 0.8
    first = result["results"][0]
    assert set(first) == {"case", "input", "expected", "got", "passed", "why", "seconds"}
    assert first["case"] == "capital-france"


def test_a_set_the_file_passes_exits_0_with_a_table(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    golden = tmp_path / "any.jsonl"
    golden.write_text(json.dumps({"prompt": "Hello", "max_tokens": 4, "regex": "."}) + "\n")
    code = main(["eval", "--file", str(demo_dir / "demo-tiny.gguf"), "--golden", str(golden)])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "demo-tiny.gguf on any.jsonl"
    assert out[2].startswith("line 1 ")
    assert out[-1] == "passed 1/1 (100%); needs 80%: pass"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--golden", "absent.jsonl"], "absent.jsonl: golden set not found"),
        (["--url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9/v1/models"),
    ],
)
def test_what_cannot_run_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    code = main(["eval", "smollm2-135m", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ensemble-ops eval: ")
    assert error in err
    assert err.count("\n") == 1
