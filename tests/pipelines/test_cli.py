"""One CLI pattern: every command registers alike, bad usage is one line and exit 2, no TensorFlow chatter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelines import cli


def test_every_command_registers_with_a_handler():
    parser = cli.build_parser()
    commands = parser.parse_args(["query", "--index", "i", "x.jpg"]).subcommands
    assert set(commands) == {"extract", "index", "query", "neighbors", "evaluate", "shard", "export-model",
                             "autoencode", "train-autoencoder", "denoise", "projector", "filters", "dream",
                             "explain", "map", "adversarial", "top-patches", "serve", "compare", "reindex"}
    for name, sub in commands.items():
        defaults = {a.dest: a.default for a in sub._actions}  # noqa: SLF001
        assert callable(sub.get_default("handler")), name
        assert sub.get_default("beam") in (True, False), name
        assert "handler" not in defaults


def test_a_missing_command_module_is_an_error_not_a_missing_command(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "pipelines.no_such_job"))
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()


@pytest.mark.parametrize("argv,message", [
    (["index", "--features", "f", "--output", "o", "--dimz", "32"],
     "unrecognised argument --dimz (did you mean --dims?)"),
    (["index", "--features", "f", "--output", "o", "--shards", "0"], "argument --shards: must be at least 1, not 0"),
    (["query", "--index", "i", "x.jpg", "--runner", "DirectRunner"], "unrecognised arguments: --runner DirectRunner"),
    (["neighbors", "--index", "i", "--output", "o", "--method", "hnws"], "argument --method: 'hnws' is not a method"),
    (["extract", "--input", "i", "--output", "o", "--max-failure-fraction", "2"],
     "argument --max-failure-fraction: must be between 0 and 1"),
])
def test_bad_usage_names_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_beam_options_pass_and_typos_of_them_do_not(capsys):
    from pipelines.runner import check_beam_args

    parser = cli.build_parser().parse_args(["index", "--features", "f", "--output", "o"]).subcommands["index"]
    assert check_beam_args(["--runner", "DataflowRunner", "--temp_location=gs://b/t", "--experiments",
                            "use_runner_v2", "--direct_num_workers", "1"], parser) is None
    assert "did you mean --temp_location" in check_beam_args(["--temp_locaton=gs://b/t"], parser)


def test_bad_input_is_one_line_with_exit_2_and_no_tensorflow_chatter(tmp_path):
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "LATEST").write_text("{not json")
    env = {**os.environ}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", "--index", str(tmp_path / "index")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(tmp_path / "index" / "LATEST") in lines[0] and "damaged" in lines[0]
    assert "Traceback" not in proc.stderr and "absl" not in proc.stderr and "cuda" not in proc.stderr.lower()


def test_the_command_table_matches_what_the_modules_register():
    import argparse
    import importlib

    from pipelines import cli

    registered = {}
    for module in cli.COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        registered.update({a.dest: (module, a.help) for a in sub._choices_actions})
    assert registered == cli.COMMANDS


def test_help_and_a_mistyped_command_answer_without_importing_a_command():
    import subprocess
    import sys

    probe = ("import sys\nfrom pipelines import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\n"
             "heavy = [m for m in ('tensorflow', 'apache_beam', 'pipelines.extract') if m in sys.modules]\n"
             "print('HEAVY', heavy, 'CODE', code)")
    for argv, code in ((["--help"], 0), (["indx"], 2), ([], 2)):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
        assert f"HEAVY [] CODE {code}" in out.stdout, out.stdout + out.stderr
