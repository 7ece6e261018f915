"""The config writer needs no tomli-w (the lent GPU machines lack it): its text reads back through tomllib to the
same values, and is the text tomli-w writes, for every shipped recipe and for awkward values."""

import math
import sys

import pytest

from gpt2forge.config import RECIPES_DIR, load_config, to_toml, toml_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AWKWARD = {
    "name": 'quote " backslash \\ tab \t newline \n cr \r bell \x07 del \x7f unicode ☃ 😀',
    "empty": "",
    "model": {"float": 1e-10, "big": 1.5e300, "neg_zero": -0.0, "third": 1 / 3, "int": -(2**62), "flag": False},
    "odd keys": {"with space": 1, "dotted.key": 2.5, "ünïcode": "x", "bare-key_1": True},
    "empty_table": {},
}


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
def test_every_recipe_round_trips_and_matches_tomli_w(recipe, tmp_path):
    config = load_config(recipe)
    text = to_toml(config)
    saved = tmp_path / "config.toml"
    saved.write_text(text)
    assert to_toml(load_config(str(saved))) == text
    tomli_w = pytest.importorskip("tomli_w")
    data = tomllib.loads(text)
    assert tomli_w.dumps(data) == text


def test_awkward_values_round_trip_and_match_tomli_w():
    text = toml_text(AWKWARD)
    back = tomllib.loads(text)
    assert back == AWKWARD and math.copysign(1, back["model"]["neg_zero"]) == -1
    tomli_w = pytest.importorskip("tomli_w")
    assert text == tomli_w.dumps(AWKWARD)
    only_tables = {k: v for k, v in AWKWARD.items() if isinstance(v, dict)}
    assert toml_text(only_tables) == tomli_w.dumps(only_tables) and toml_text({}) == ""


def test_non_finite_floats_and_bad_types():
    assert tomllib.loads(toml_text({"a": math.inf, "b": -math.inf}))["b"] == -math.inf
    assert math.isnan(tomllib.loads(toml_text({"n": math.nan}))["n"])
    with pytest.raises(TypeError, match="list"):
        toml_text({"x": [1, 2]})

