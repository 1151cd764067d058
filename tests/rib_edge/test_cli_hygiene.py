"""Every command, bad input: one line that says what is wrong, a non-zero exit, never a traceback.

Commands are enumerated from the click group, so a command added later is walked too.
"""

from __future__ import annotations

import math
import zipfile

import click
import pytest
from click.testing import CliRunner

from rib_edge.cli import main
from rib_edge.cli_common import FiniteFloatRange


def _commands(command: click.Command = main, path: tuple[str, ...] = ()):
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


COMMANDS = list(_commands())
NUMERIC = (click.types.IntParamType, click.types.FloatParamType)
# String options whose values are numbers the command parses itself.
NUMBER_LISTS = {
    ("bench", "fl"): {"--epsilons": ["-1", "0", "nan", "inf", "x"], "--spread-seeds": ["-3", "x"]}
}


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.is_flag]


def _bad_values(option: click.Option) -> list[str]:
    kind = option.type
    values = ["not-a-number"]
    low = getattr(kind, "min", None)
    if low is not None:
        values.append(str(low - 1))
        if getattr(kind, "min_open", False):
            values.append(str(low))
    high = getattr(kind, "max", None)
    if high is not None:
        values.append(str(high + 1))
    if isinstance(kind, click.types.FloatParamType):
        values += ["nan", "inf"]
    return values


def _one_line_error(result, *mentions: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert (
        "Traceback" not in result.output
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    ), result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for mention in mentions:
        assert mention in lines[0], (mention, lines[0])


def test_the_walk_sees_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"train", "eval", "data synth", "edge recommend", "bench fl", "simulate", "fl join"} <= names


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_numeric_option_is_range_checked(path, command):
    for option in _options(command):
        if isinstance(option.type, NUMERIC):
            assert isinstance(option.type, click.types._NumberRangeBase), (path, option.opts)
            assert option.type.min is not None or option.type.max is not None, (path, option.opts)
            if isinstance(option.type, click.types.FloatParamType):
                assert isinstance(option.type, FiniteFloatRange), (path, option.opts)


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_bad_numbers_are_one_line_and_exit_2(path, command):
    runner = CliRunner()
    cases = [(o.opts[0], v) for o in _options(command) if isinstance(o.type, NUMERIC) for v in _bad_values(o)]
    cases += [(name, v) for name, values in NUMBER_LISTS.get(path, {}).items() for v in values]
    for name, value in cases:
        result = runner.invoke(main, [*path, name, value], prog_name="rib-edge")
        assert result.exit_code == 2, (path, name, value, result.output)
        _one_line_error(result, name, f"rib-edge {' '.join(path)} --help")


def test_the_reported_cases(tmp_path):
    runner = CliRunner()
    for args, mention in (
        (["data", "synth", "--devices", "-5", "--out", str(tmp_path / "e.jsonl")], "--devices"),
        (["train", "--dataset", "synthetic", "--epochs", "-1", "--out", str(tmp_path / "r")], "--epochs"),
        (
            ["train", "--dataset", "synthetic", "--batch-size", "0", "--out", str(tmp_path / "r")],
            "--batch-size",
        ),
        (["train", "--dataset", "synthetic", "--lr", "nan", "--out", str(tmp_path / "r")], "--lr"),
        (
            ["train", "--dataset", "synthetic", "--test-fraction", "0.2", "--test-days", "3", "--out", "x"],
            "not both",
        ),
    ):
        result = runner.invoke(main, args, prog_name="rib-edge")
        assert result.exit_code == 2, result.output
        _one_line_error(result, mention)
    assert not (tmp_path / "e.jsonl").exists() and not (tmp_path / "r").exists()  # nothing written


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    garbage = base / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 3)
    empty = base / "empty.bin"
    empty.write_bytes(b"")
    truncated = base / "truncated.pt"  # a zip (what torch.save writes) cut short
    with zipfile.ZipFile(base / "whole.zip", "w") as archive:
        archive.writestr("archive/data.pkl", b"x" * 5000)
    truncated.write_bytes((base / "whole.zip").read_bytes()[:300])
    not_toml = base / "mapping.toml"
    not_toml.write_text("[actions\npv = ")
    package = base / "package"
    package.mkdir()
    (package / "manifest.json").write_text("{not json")
    log = base / "log.csv"
    log.write_text("session_id,timestamp,item_id,action\ns1,1700000000,a,view\ns1,1700000100,b,view\n")
    from edge_client.package import generate_keypair

    private, public = generate_keypair(base / "keys")
    return {
        "garbage": garbage,
        "empty": empty,
        "truncated": truncated,
        "mapping": not_toml,
        "package": package,
        "log": log,
        "private": private,
        "public": public,
        "base": base,
    }


def _fill(command: click.Command, files: dict, tmp_path, **given: str) -> list[str]:
    """Valid-looking values for every required parameter of ``command``, with ``given`` ones instead."""
    fillers = {
        "--dataset": "synthetic",
        "--out": str(tmp_path / "out"),
        "--key": str(files["private"]),
        "--public-key": str(files["public"]),
        "--checkpoint": str(files["garbage"]),
        "--package": str(files["package"]),
        "--package-dir": str(files["package"]),
        "--events": str(files["log"]),
        "--store": str(tmp_path / "store"),
        "--superlink": "127.0.0.1:1",
        "--device-dir": str(tmp_path),
    }
    args: list[str] = []
    for param in command.params:
        if isinstance(param, click.Argument):
            args.append(
                given.pop(param.name, str(files["package"]) if "package" in param.name else "synthetic")
            )
        elif param.opts[0] in given:
            args += [param.opts[0], given.pop(param.opts[0])]
        elif param.required:
            args += [param.opts[0], fillers[param.opts[0]]]
    assert not given, given
    return args


def _commands_with(option: str):
    return [(p, c) for p, c in COMMANDS if any(option in o.opts for o in _options(c))]


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated"])
def test_a_file_that_is_not_a_checkpoint_is_one_line_and_exit_2(bad_files, tmp_path, kind):
    commands = _commands_with("--checkpoint")
    assert {" ".join(p) for p, _ in commands} >= {"eval", "case-study", "edge package"}
    for path, command in commands:
        args = _fill(command, bad_files, tmp_path, **{"--checkpoint": str(bad_files[kind])})
        result = CliRunner().invoke(main, [*path, *args], prog_name="rib-edge")
        assert result.exit_code == 2, (path, result.output)
        _one_line_error(result, "not a RIB checkpoint", str(bad_files[kind]))


@pytest.mark.parametrize("kind", ["garbage", "empty"])
def test_a_bad_public_key_or_package_is_one_line_and_exit_2(bad_files, tmp_path, kind):
    commands = _commands_with("--public-key")
    assert {" ".join(p) for p, _ in commands} >= {"edge verify", "edge recommend", "edge serve", "fl join"}
    for path, command in commands:
        result = CliRunner().invoke(
            main, [*path, *_fill(command, bad_files, tmp_path, **{"--public-key": str(bad_files[kind])})]
        )
        assert result.exit_code == 2, (path, result.output)
        _one_line_error(result, "refus")
    # A directory that is not a package, with a good key.
    for path, command in commands:
        result = CliRunner().invoke(main, [*path, *_fill(command, bad_files, tmp_path)])
        assert result.exit_code == 2, (path, result.output)
        _one_line_error(result, "refus")


def test_a_bad_mapping_file_is_one_line_and_exit_2(bad_files, tmp_path):
    commands = _commands_with("--mapping")
    assert len(commands) >= 9  # every command that takes --dataset
    for path, command in commands:
        given = {"--mapping": str(bad_files["mapping"])}
        if any(isinstance(p, click.Argument) for p in command.params):
            given["dataset"] = str(bad_files["log"])
        else:
            given["--dataset"] = str(bad_files["log"])
        result = CliRunner().invoke(main, [*path, *_fill(command, bad_files, tmp_path, **given)])
        assert result.exit_code == 2, (path, result.output)
        _one_line_error(result, "--mapping", "not valid TOML")


def test_messages_name_flags_not_python_parameters(bad_files, tmp_path):
    runner = CliRunner()
    keys = tmp_path / "keys"
    assert runner.invoke(main, ["edge", "keygen", "--out", str(keys)]).exit_code == 0
    result = runner.invoke(main, ["edge", "keygen", "--out", str(keys)])
    assert result.exit_code == 2
    _one_line_error(result, "--force")
    assert "overwrite" not in result.output
    args = ["--store", str(tmp_path / "s"), "--package", str(bad_files["package"])]
    result = runner.invoke(
        main, ["edge", "serve", *args, "--public-key", str(bad_files["public"]), "--host", "0.0.0.0"]
    )
    assert result.exit_code == 2
    _one_line_error(result, "--allow-remote")
    assert "allow_remote" not in result.output


def test_a_busy_port_names_the_flag(tmp_path):
    import socket

    from rib_edge.cli_common import BadInput, check_port_free

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BadInput, match=f"port {port} on 127.0.0.1 is busy; choose another with --port"):
            check_port_free("127.0.0.1", port)
        result = CliRunner().invoke(main, ["fl", "serve", "--insecure", "--port", str(port)])
        assert result.exit_code == 2
        _one_line_error(result, "--port", "busy")
    check_port_free("127.0.0.1", port)  # free again


def test_an_unexpected_error_is_one_line_unless_asked(monkeypatch, tmp_path):
    import model.data.open

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(model.data.open, "open_dataset", broken)
    result = CliRunner().invoke(main, ["data", "prepare", "synthetic"])
    assert result.exit_code == 1
    _one_line_error(result, "internal error (ZeroDivisionError: a bug)", "RIB_EDGE_TRACEBACK")
    monkeypatch.setenv("RIB_EDGE_TRACEBACK", "1")
    result = CliRunner().invoke(main, ["data", "prepare", "synthetic"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_finite_float_range():
    kind = FiniteFloatRange(min=0, min_open=True)
    assert kind.convert("2.5", None, None) == 2.5
    for bad in ("nan", "inf", "0", "-1"):
        with pytest.raises(click.BadParameter):
            kind.convert(bad, None, None)
    assert not math.isnan(kind.convert("1e-9", None, None))
