"""The dslocal command line: verbs, help, passthrough options of bench."""
import pytest

from dslocal.gui import cli


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("run", "info", "synth", "bench"):
        assert verb in out


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "x.gguf", "--bogus"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_bench_passes_its_options_on(tiny_gguf, capsys, tmp_path):
    rc = cli.main(["bench", "--gguf", tiny_gguf("tiny-v2", "q8_0"), "--prompt-lengths", "8", "--gen", "4",
                   "--repeat", "1", "--dram-gib", "0.25", "--json", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "prefill_tokens_per_s" in out
