"""quanta.envs: every QUANTA_* variable the package reads is registered there and read through it; bad values
raise errors that name the variable and what it takes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quanta import envs

SRC = Path(__file__).resolve().parents[1] / "src" / "quanta"


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in SRC.rglob("*.py") if p.name != "envs.py"}


def test_no_quanta_variable_read_outside_envs() -> None:
    for path, text in _sources().items():
        assert not re.search(r"environ(\.get)?[\[(]\s*f?[\"']QUANTA_", text), path


def test_every_registered_variable_is_read_and_every_read_is_registered() -> None:
    text = "\n".join(_sources().values())
    read = set(re.findall(r"envs\.get\(\"(QUANTA_[A-Z0-9_]+)\"\)", text))
    registered = set(envs.registered())
    assert read <= registered
    # the fused-GEMV configs are read by a formatted name (QUANTA_GEMV_FUSED_CONFIG_{NORM,SILU})
    assert registered - read == {"QUANTA_GEMV_FUSED_CONFIG_NORM", "QUANTA_GEMV_FUSED_CONFIG_SILU"}


def test_defaults_and_parsing(monkeypatch) -> None:
    for name in envs.registered():
        monkeypatch.delenv(name, raising=False)
    assert envs.get("QUANTA_PDL") is True and envs.get("QUANTA_GEMV_LMHEAD") is False
    assert envs.get("QUANTA_FUSED_NORM_MAX_MB") == 16 and envs.get("QUANTA_BENCH_FLUSH") == "write"
    monkeypatch.setenv("QUANTA_PDL", "0")
    monkeypatch.setenv("QUANTA_DECODE_MAX_SPLITS", "8")
    assert envs.get("QUANTA_PDL") is False and envs.get("QUANTA_DECODE_MAX_SPLITS") == 8
    assert "QUANTA_PDL = '0'" in envs.describe()


def test_env_command(capsys) -> None:
    from quanta.cli import main

    assert main(["env"]) == 0
    assert "QUANTA_PDL" in capsys.readouterr().out


@pytest.mark.parametrize("name,value,expect", [
    ("QUANTA_PDL", "yes", "QUANTA_PDL='yes': expected 0 or 1"),
    ("QUANTA_FUSED_NORM_MAX_MB", "16MB", "QUANTA_FUSED_NORM_MAX_MB='16MB': expected an integer"),
    ("QUANTA_BENCH_FLUSH", "none", "QUANTA_BENCH_FLUSH='none': expected one of write, read"),
])
def test_bad_values_name_the_variable(monkeypatch, name, value, expect) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(expect)):
        envs.get(name)


def test_unknown_name_is_an_error() -> None:
    with pytest.raises(KeyError):
        envs.get("QUANTA_NO_SUCH_SWITCH")
