"""The manual pages and completions the package ships, rendered as scripts/package renders
them (swapfs.cli.manual): swapfs.toml(5) lists every key the configuration parser accepts
with the default the parser applies (and refuses to build when they disagree), swapfs(8)
every command, both render without groff warnings, the completions load and complete, and
the example configuration passes check-config."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from swapfs import config
from swapfs.cli import build_parser, main, manual

pytest.importorskip("argparse_manpage", reason="build-only: the package extra (scripts/setup installs it)")
pytest.importorskip("shtab", reason="build-only: the package extra (scripts/setup installs it)")


def render(page: str, tmp_path: Path) -> str:
    """The page as man shows it; groff's warnings (-ww) fail the test."""
    if not shutil.which("groff"):
        pytest.skip("groff is missing (groff-base)")
    src = tmp_path / "page"
    src.write_text(page)
    out = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-rLL=100n", str(src)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    plain = re.sub(".\b", "", out.stdout)  # grotty's overstrike bold and underline
    return plain.replace("\u2010", "-").replace("\u2212", "-")


def test_config_page_lists_every_key_with_its_default(tmp_path: Path) -> None:
    text = render(manual.config_manual(date="2026-01-01"), tmp_path)
    for cls in (config.PoolConfig, config.DeviceConfig, config.TierConfig):
        for field in dataclasses.fields(cls):
            assert f"{field.name} = " in text, field.name
    assert 'max_bytes = size or share of RAM (default "20%")' in text
    assert "name = string (required)" in text
    assert f"at most {config.MAX_DEVICES}" in text
    assert config.DEFAULT_CONFIG_TOML.splitlines()[1] in text  # the embedded default, shown


def test_a_key_without_prose_stops_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tuple(k for k in manual.POOL_KEYS if k.name != "dedup")
    tables = tuple((t[0], t[1], t[2], keys, t[4]) if t[0] == "pool" else t for t in manual.TABLES)
    monkeypatch.setattr(manual, "TABLES", tables)
    with pytest.raises(manual.ManualError, match=r"pool: keys without prose .*'dedup'"):
        manual.config_manual()


def test_a_wrong_default_stops_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    original = manual.TABLES
    wrong = tuple(dataclasses.replace(k, default="0.7") if k.name == "accept_ratio" else k
                  for k in manual.POOL_KEYS)
    tables = tuple((t[0], t[1], t[2], wrong, t[4]) if t[0] == "pool" else t for t in original)
    monkeypatch.setattr(manual, "TABLES", tables)
    with pytest.raises(manual.ManualError, match=r"pool.accept_ratio: documented default 0.7"):
        manual.config_manual()
    required = tuple(dataclasses.replace(k, default=manual.REQUIRED) if k.name == "writeback" else k
                     for k in manual.DEVICE_KEYS)
    tables = tuple((t[0], t[1], t[2], required, t[4]) if t[0] == "device" else t for t in original)
    monkeypatch.setattr(manual, "TABLES", tables)
    with pytest.raises(manual.ManualError, match=r"device.writeback: documented as required"):
        manual.config_manual()


def test_command_page_has_every_command(tmp_path: Path) -> None:
    text = render(manual.command_manual(date="2026-01-01"), tmp_path)
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for action in sub._choices_actions:  # type: ignore[attr-defined]
        assert f"swapfs {action.dest}" in text, action.dest
    assert "COMMANDS" in text and "SEE ALSO" in text and "swapfs.toml(5)" in text
    assert "--print-default" in text


def test_bash_completion_loads_and_completes(tmp_path: Path) -> None:
    script = tmp_path / "swapfs.bash"
    script.write_text(manual.completion("bash"))

    def complete(*words: str) -> list[str]:
        out = subprocess.run(
            ["bash", "-c", f"source {script} && COMP_WORDS=(swapfs {' '.join(words)}) && "
             f"COMP_CWORD={len(words)} && _shtab_swapfs && printf '%s\\n' \"${{COMPREPLY[@]}}\""],
            capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert complete("sw") == ["swapon", "swapoff"]
    assert "--standby" in complete("mount", "--st")
    assert complete("mount", "--transport", "") == ["classic", "uring", "auto"]


def test_zsh_completion_loads(tmp_path: Path) -> None:
    if not shutil.which("zsh"):
        pytest.skip("zsh is not installed (scripts/setup installs it)")
    (tmp_path / "_swapfs").write_text(manual.completion("zsh"))
    out = subprocess.run(["zsh", "-f", "-c", f"fpath=({tmp_path} $fpath); autoload -U compinit; "
                          f"compinit -u -d {tmp_path}/dump; print ${{_comps[swapfs]}}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "_swapfs", out.stdout + out.stderr


def test_example_configuration_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = tmp_path / "main.toml"
    example.write_text(manual.EXAMPLE_CONFIG)
    assert main(["check-config", str(example)]) == 0, capsys.readouterr().err
    parsed = config.load_config(str(example))
    assert parsed.devices[0].swap  # the generator's unit turns swap on over it
