"""Workload loading: JSONL files (with line-numbered errors), the --num-prompts limit, random
datasets, and the CLI's exit code 2 for a malformed file."""

from __future__ import annotations

import json
import os

import pytest

from pagedllm.entrypoints.bench import main
from pagedllm.entrypoints.bench.datasets import (
    BenchRequest,
    load_jsonl_dataset,
    random_text_requests,
    random_token_requests,
)

PEER_WORKLOAD = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "..",
    "..",
    "..",
    "shared",
    "peers",
    "workload.jsonl",
)


def _write(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "workload.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _line(prompt="hello world", output_len=4, **extra) -> str:
    return json.dumps({"prompt": prompt, "output_len": output_len, **extra})


def test_valid_file(tmp_path):
    path = _write(tmp_path, [_line("a b", 3, prompt_len=2), "", _line("c", 5)])
    assert load_jsonl_dataset(path) == [
        BenchRequest(prompt="a b", output_len=3, prompt_len=2),
        BenchRequest(prompt="c", output_len=5, prompt_len=None),
    ]


def test_num_prompts_takes_the_first_n(tmp_path):
    path = _write(tmp_path, [_line(f"p{i}", i + 1) for i in range(5)])
    reqs = load_jsonl_dataset(path, num_prompts=2)
    assert [r.prompt for r in reqs] == ["p0", "p1"]


def test_num_prompts_stops_before_a_later_bad_line(tmp_path):
    path = _write(tmp_path, [_line(), _line(), "{broken"])
    assert len(load_jsonl_dataset(path, num_prompts=2)) == 2


def test_num_prompts_beyond_the_file_is_an_error(tmp_path):
    path = _write(tmp_path, [_line(), _line()])
    with pytest.raises(ValueError, match="holds 2 requests, --num-prompts asked for 3"):
        load_jsonl_dataset(path, num_prompts=3)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"output_len": 4}), "'prompt' must be a non-empty string"),
        (json.dumps({"prompt": "", "output_len": 4}), "'prompt' must be a non-empty string"),
        (json.dumps({"prompt": "x"}), "'output_len' must be a positive integer"),
        (json.dumps({"prompt": "x", "output_len": 0}), "'output_len' must be a positive integer"),
        (json.dumps({"prompt": "x", "output_len": True}), "'output_len' must be a positive"),
        (json.dumps({"prompt": "x", "output_len": 2.5}), "'output_len' must be a positive"),
        (json.dumps({"prompt": "x", "output_len": 2, "prompt_len": -1}), "'prompt_len' must be"),
    ],
)
def test_malformed_line_names_its_line_number(tmp_path, bad, message):
    # Line 3 of the file (a blank line still counts as a line).
    path = _write(tmp_path, [_line(), "", bad, _line()])
    with pytest.raises(ValueError, match=message) as info:
        load_jsonl_dataset(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_empty_file_is_an_error(tmp_path):
    path = _write(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match="holds no requests"):
        load_jsonl_dataset(path)


def test_random_token_requests_shape_and_seed():
    reqs = random_token_requests(5, input_len=16, output_len=8, vocab_size=320, seed=3)
    assert len(reqs) == 5
    for r in reqs:
        assert len(r.prompt) == 16 and r.prompt_len == 16 and r.output_len == 8
        assert all(isinstance(t, int) and 0 <= t < 320 for t in r.prompt)
    assert reqs == random_token_requests(5, 16, 8, 320, seed=3)
    assert reqs != random_token_requests(5, 16, 8, 320, seed=4)


def test_random_text_requests_have_input_len_words():
    reqs = random_text_requests(3, input_len=20, output_len=7, seed=0)
    assert [len(r.prompt.split()) for r in reqs] == [20, 20, 20]
    assert {r.output_len for r in reqs} == {7}
    assert reqs == random_text_requests(3, 20, 7, seed=0)


@pytest.mark.parametrize("kwargs", [{"num_prompts": 0}, {"input_len": -1}, {"output_len": 0}])
def test_random_shape_is_validated(kwargs):
    args = {"num_prompts": 2, "input_len": 4, "output_len": 4, **kwargs}
    with pytest.raises(ValueError):
        random_token_requests(**args, vocab_size=100)


@pytest.mark.skipif(not os.path.exists(PEER_WORKLOAD), reason="the peers' workload is not here")
def test_the_peer_workload_loads():
    reqs = load_jsonl_dataset(PEER_WORKLOAD)
    assert len(reqs) == 200
    assert sum(r.output_len for r in reqs) == 27140
    assert sum(r.prompt_len for r in reqs) == 53848


def test_cli_malformed_dataset_exits_2_without_traceback(tmp_path, capsys):
    path = _write(tmp_path, [_line(), _line(output_len="many")])
    assert main(["throughput", "--dataset", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and "output_len" in err
    assert "Traceback" not in err


def test_cli_serve_malformed_dataset_exits_2(tmp_path, capsys):
    path = _write(tmp_path, ["oops"])
    assert main(["serve", "--dataset", path, "--model", "m", "--base-url", "http://x"]) == 2
    assert f"{path}:1:" in capsys.readouterr().err


def test_cli_bad_flag_value_exits_2(capsys):
    assert main(["serve", "--goodput", "ttft=5", "--model", "m"]) == 2
    assert "--goodput" in capsys.readouterr().err
    assert main(["serve", "--max-concurrency"]) == 2  # argparse's own usage error
