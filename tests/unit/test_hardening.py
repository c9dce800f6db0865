"""Hostile input never crashes a decoder, and the security defaults hold (issue 6)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, strategies as st

from shmkv import transport as tp
from shmkv.config import EngineConfig
from shmkv.errors import ConfigError, ProtocolError

PACKAGE = Path(__file__).resolve().parents[2] / "shmkv"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(st.lists(st.binary(max_size=200), max_size=6))
def test_transport_decode_rejects_garbage_with_protocol_error_only(frames: list[bytes]) -> None:
    try:
        msg = tp.decode(frames)
    except ProtocolError:
        return
    assert msg.type in tp.MESSAGE_TYPES


@given(
    st.dictionaries(st.text(max_size=10), json_values, max_size=8),
    st.sampled_from(sorted(tp.MESSAGE_TYPES)),
)
def test_transport_round_trip_and_field_checks(body: dict[str, Any], msg_type: str) -> None:
    body = {k: v for k, v in body.items() if k not in ("v", "t")}
    msg = tp.decode(tp.encode(msg_type, body, [b"x"]))
    assert msg.type == msg_type
    assert msg.body == body
    assert msg.frames == (b"x",)
    for key, value in body.items():
        if not isinstance(value, int) or isinstance(value, bool):
            with pytest.raises(ProtocolError):
                tp.require(body, key, int)


def test_transport_rejects_wrong_version_unknown_type_and_oversize() -> None:
    with pytest.raises(ProtocolError, match="version"):
        tp.decode([orjson.dumps({"v": 99, "t": "ping"})])
    with pytest.raises(ProtocolError, match="unknown message type"):
        tp.decode([orjson.dumps({"v": tp.PROTOCOL_VERSION, "t": "rm -rf"})])
    with pytest.raises(ProtocolError, match="frames"):
        tp.decode([b"{}"] * (tp.MAX_FRAMES + 1))
    with pytest.raises(ProtocolError, match="header"):
        tp.decode([b" " * (tp.MAX_HEADER_BYTES + 1)])
    with pytest.raises(ProtocolError, match="not a JSON object"):
        tp.decode([b"[1, 2]"])
    with pytest.raises(ProtocolError):
        tp.encode("no-such-type")


@given(st.dictionaries(st.text(max_size=30), json_values, max_size=6))
def test_engine_args_mapping_raises_only_config_error(values: dict[str, Any]) -> None:
    try:
        config = EngineConfig.from_mapping(values)
    except ConfigError:
        return
    assert config.num_gpu_blocks > 0


@given(st.sampled_from(EngineConfig.field_names()), json_values)
def test_each_engine_field_validates_its_type(name: str, value: Any) -> None:
    try:
        config = EngineConfig.from_mapping({name: value})
    except ConfigError:
        return
    assert getattr(config, name) == value
    if isinstance(value, str):
        assert name in ("preemption_mode", "eviction")


def test_nothing_is_ever_unpickled() -> None:
    """No module imports pickle, marshal or shelve, and none calls an unpickling loader."""
    forbidden = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}
    offenders: list[str] = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            if forbidden.intersection(names):
                offenders.append(str(path))
            if isinstance(node, ast.Attribute) and node.attr in ("recv_pyobj", "recv_serialized"):
                offenders.append(f"{path}: {node.attr}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5557", True),
        ("tcp://localhost:1", True),
        ("tcp://[::1]:1", True),
        ("ipc:///tmp/x", True),
        ("tcp://0.0.0.0:5557", False),
        ("tcp://*:5557", False),
        ("tcp://10.1.2.3:5557", False),
    ],
)
def test_loopback_detection(endpoint: str, loopback: bool) -> None:
    assert tp.is_loopback(endpoint) is loopback


def test_exposed_bind_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tp.warn_if_exposed("tcp://0.0.0.0:5557", "KV events")
        tp.warn_if_exposed("tcp://127.0.0.1:5557", "KV events")
    assert len(caplog.records) == 1
    assert "reachable from other hosts" in caplog.records[0].getMessage()


def test_cli_defaults_bind_loopback() -> None:
    from shmkv.cli import build_parser

    args = build_parser().parse_args(["replay"])
    assert args.event_host == "127.0.0.1"
    fleet = build_parser().parse_args(["fleet"])
    assert fleet.metrics_host == "127.0.0.1"
