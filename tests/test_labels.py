"""Tests of the class-name mapping shared by the capture tool and importers."""

import pytest

from data_tools import capture
from data_tools.labels import accepted_names, canonical_expression, is_dropped
from dicefer_jax.contract import EXPRESSIONS
from dicefer_jax.errors import DataError


@pytest.mark.parametrize("name,expected", [
    ("Angry", "anger"), ("anger", "anger"), ("MAD", "anger"),
    ("Happy", "happiness"), ("happiness", "happiness"), ("Joy", "happiness"),
    ("Sad", "sadness"), ("SADNESS", "sadness"),
    ("Surprise", "surprise"), ("surprised", "surprise"),
    ("Fear", "fear"), ("Fearful", "fear"), ("afraid", "fear"), ("Scared", "fear"),
    ("Disgust", "disgust"), ("disgusted", "disgust"),
    ("Neutral", "neutral"), ("calm", "neutral"),
    ("HA", "happiness"), ("AF", "fear"),
    # Whitespace and punctuation around the name are tolerated.
    ("  happy\n", "happiness"), ("Happy/", "happiness"), ('"Sad",', "sadness"),
    ("[fear]", "fear"), ("_Neutral_", "neutral"),
])
def test_aliases(name, expected):
  assert canonical_expression(name) == expected


def test_canonical_names_map_to_themselves():
  for name in EXPRESSIONS:
    assert canonical_expression(name) == name
    assert canonical_expression(name.upper()) == name


def test_capture_folders_are_known():
  canon = {canonical_expression(f) for f in capture.KEY_MAP.values()}
  assert canon == set(EXPRESSIONS)


@pytest.mark.parametrize("name", ["contempt", "Contempt", " CONTEMPT ", "None",
                                  "Uncertain"])
def test_dropped_classes(name):
  assert canonical_expression(name) is None
  assert is_dropped(name)


@pytest.mark.parametrize("name", ["bored", "", "happy sad", "12", "very_happy"])
def test_unknown_is_a_data_error(name):
  with pytest.raises(DataError) as info:
    canonical_expression(name)
  message = str(info.value)
  assert repr(name) in message
  assert "\n" not in message
  for canonical in EXPRESSIONS:
    assert canonical in message
  assert not is_dropped(name)


def test_accepted_names_start_with_the_canonical_ones():
  names = accepted_names()
  assert tuple(names[:len(EXPRESSIONS)]) == EXPRESSIONS
  assert len(names) == len(set(names))


def test_every_accepted_name_maps_to_a_class():
  """Catches an error message that advertises a spelling canonical_expression
  rejects, or a dropped one (contempt) listed as accepted."""
  for name in accepted_names():
    assert canonical_expression(name) in EXPRESSIONS, name
