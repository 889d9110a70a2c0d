"""docs/config.md is generated from config.py: a key, default or docstring changed there and not here fails."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from side_extract import config as cfg

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_the_config_reference_page_is_current():
    assert DOC.read_text() == cfg.reference_markdown(), f"docs/config.md is stale; regenerate it: {cfg.REFERENCE_COMMAND}"


def test_the_reference_names_every_key_with_its_default():
    text = cfg.reference_markdown()
    run = cfg.RunConfig()
    for f in dataclasses.fields(run):
        section = getattr(run, f.name)
        if not dataclasses.is_dataclass(section):
            assert f"| `{f.name}` |" in text
            continue
        for g in dataclasses.fields(section):
            assert f"| `{f.name}.{g.name}` |" in text, f"{f.name}.{g.name} missing"
    assert "| `extract.scale` | `3.0` | float |" in text  # SIDE's default lambda, README "Defaults"
    assert "| `sample.scheduler` | `ddim` | 'ddim' or 'ddpm' |" in text
    assert "| `lora.rank` | `64` | int or 'full' |" in text


def test_every_key_is_said_by_name_or_in_its_meaning_column():
    """61 keys (the training set, tau, every Carlini, Gu and detection setting, the sweeps...) had a default and a
    type and nothing that said what they do: each is now named in its section's documentation or given a meaning."""
    import inspect

    run = cfg.RunConfig()
    missing = []
    for f in dataclasses.fields(run):
        section = getattr(run, f.name)
        if not dataclasses.is_dataclass(section):
            if ("RunConfig", f.name) not in cfg.KEY_DOCS:
                missing.append(f.name)
            continue
        doc = inspect.cleandoc(type(section).__doc__ or "")
        for g in dataclasses.fields(section):
            named = f"``{g.name}``" in doc or f"`{g.name}`" in doc
            if not named and (type(section).__name__, g.name) not in cfg.KEY_DOCS:
                missing.append(f"{f.name}.{g.name}")
    assert not missing, f"keys said nowhere: {missing}"
    fields = {(type(v).__name__, g.name) for f in dataclasses.fields(run)
              for v in [getattr(run, f.name)] if dataclasses.is_dataclass(v) for g in dataclasses.fields(v)}
    assert set(cfg.KEY_DOCS) <= fields | {("RunConfig", f.name) for f in dataclasses.fields(run)}  # no stale entry


def test_a_range_error_names_the_section_of_its_key():
    """`sample.n: -5` and `extract.n: -1` both said 'n=... must be a positive integer' (side run reads both)."""
    import pytest

    for data, said in [({"sample": {"n": -5}}, "sample.n=-5 must be a positive integer"),
                       ({"extract": {"n": -1}}, "extract.n=-1 must be a positive integer"),
                       ({"lora": {"steps": 0}}, "lora.steps=0 must be a positive integer")]:
        with pytest.raises(ValueError, match=said.replace(".", r"\.")):
            cfg.from_dict(cfg.RunConfig, data)
