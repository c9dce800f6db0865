"""`shmkv replay` end to end in-process: outputs, and bad input failing cleanly (exit 2,
a message that says what to change, no report file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shmkv.cli import main

SMALL = ["--request-count", "20", "--input-tokens", "64", "--output-tokens", "4", "--quiet"]


def test_replay_writes_report_and_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, state = tmp_path / "report.json", tmp_path / "state.json"
    code = main(
        [
            "replay",
            *SMALL,
            "--data-parallel-size",
            "2",
            "--router-mode",
            "kv",
            "--report",
            str(report),
            "--dump-state",
            str(state),
        ]
    )
    assert code == 0
    data = json.loads(report.read_text())
    assert data["completed_requests"] == 20
    for key in (
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_itl_ms",
        "mean_e2e_latency_ms",
        "prefix_cache_reused_ratio",
        "first_admission_prefix_cache_reused_ratio",
        "duration_ms",
        "wall_time_ms",
    ):
        assert key in data
    dump = json.loads(state.read_text())
    assert dump["block_size"] == 16
    assert set(dump["ranks"]) == {"0", "1"}
    assert set(dump["ranks"]["0"]) == {"device", "host_pinned"}
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in dump["ranks"]["0"]["device"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "state.json"], (
        "no temp files"
    )
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert headline["completed_requests"] == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--request-rate", "5", "--replay-concurrency", "3"], "choose one arrival mode"),
        (["--num-gpu-blocks-override", "-3"], "num_gpu_blocks"),
        (["--bandwidth-g1-to-g2-gbps", "3"], "--num-g2-blocks"),
        (["--extra-engine-args", "{not json"], "invalid JSON"),
        (["--extra-engine-args", '{"bogus_key": 1}'], "unknown engine argument"),
        (["--extra-engine-args", '{"block_size": "16"}'], "block_size"),
        (["--block-size", "1"], "block_size"),
        (["--data-parallel-size", "0"], "data-parallel-size"),
        (["--shared-prefix-ratio", "1.5", "--num-prefix-groups", "2"], "shared_prefix_ratio"),
    ],
)
def test_bad_options_exit_2_without_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    report = tmp_path / "report.json"
    assert main(["replay", *SMALL, "--report", str(report), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not report.exists()


def test_malformed_trace_line_names_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"timestamp": 0, "input_length": 32, "output_length": 2, "hash_ids": [1, 2]}\n'
        '{"timestamp": 5, "input_length": 32, "output_length": -1, "hash_ids": [3, 4]}\n'
    )
    report = tmp_path / "report.json"
    assert main(["replay", "--trace", str(trace), "--report", str(report), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{trace}:2" in err
    assert "output_length" in err
    assert not report.exists()


def test_trace_replay_runs(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [
        json.dumps(
            {"timestamp": 10 * i, "input_length": 48, "output_length": 3, "hash_ids": [1, 2, 3 + i]}
        )
        for i in range(10)
    ]
    trace.write_text("\n".join(lines) + "\n")
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "replay",
                "--trace",
                str(trace),
                "--trace-block-size",
                "16",
                "--report",
                str(report),
                "--quiet",
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert data["completed_requests"] == 10
    assert data["prefix_cache_reused_ratio"] > 0, "the shared hash_ids 1, 2 are reused"


def test_missing_output_directory_fails_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", *SMALL, "--report", str(tmp_path / "nope" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_explains_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("replay", "events", "fleet"):
        assert command in out
