"""Maps the class names that datasets and folders use onto the canonical ones.

Every face set written for training uses the seven canonical names of
`dicefer_jax.contract.EXPRESSIONS`. Raw data names them many ways: folder names
from the capture tool (`Happy`, `Angry`), dataset vocabularies (`happiness`,
`anger`, `Surprised`), short codes (JAFFE/KDEF's `HA`, `AN`, `AF`) and so on.
`canonical_expression` is the single place that knows these spellings, so that
the capture tool, the folder-tree preprocessing and every dataset importer agree.

Contempt (CK+, AffectNet) is not one of the seven classes the model predicts; it
maps to None so callers drop those images deliberately instead of failing.
"""

import string

from dicefer_jax.contract import EXPRESSIONS
from dicefer_jax.errors import DataError

# Spellings per canonical class. Keys of _ALIASES below are these lowered.
# Two-letter codes are the JAFFE/KDEF file-name codes (KDEF writes fear as AF,
# "afraid"); three-letter ones are common abbreviations in folder names.
_SPELLINGS = {
    "neutral": ("neutral", "neutrality", "calm", "ne", "neu"),
    "anger": ("anger", "angry", "mad", "annoyed", "an", "ang"),
    "disgust": ("disgust", "disgusted", "disgusting", "di", "dis"),
    "fear": ("fear", "fearful", "afraid", "scared", "frightened", "fe", "af",
             "fea"),
    "happiness": ("happiness", "happy", "joy", "joyful", "smile", "smiling",
                  "ha", "hap"),
    "sadness": ("sadness", "sad", "unhappy", "sa"),
    "surprise": ("surprise", "surprised", "surprising", "astonished", "su",
                 "sur"),
}

# Classes that exist in some datasets but are not predicted: mapped to None.
# Besides contempt, AffectNet's non-expression categories ("None" means none of
# the eight, not neutral) are dropped rather than mistaken for a class.
_DROPPED = ("contempt", "contemptuous", "co", "none", "uncertain", "no-face",
            "no_face", "noface", "no face")

_ALIASES = {alias: canonical
            for canonical, aliases in _SPELLINGS.items() for alias in aliases}
assert set(_SPELLINGS) == set(EXPRESSIONS), "labels must cover contract.EXPRESSIONS"
assert len(_ALIASES) == sum(len(v) for v in _SPELLINGS.values()), "duplicate alias"
assert not set(_DROPPED) & set(_ALIASES)

# Stripped from both ends, so `Happy/`, ` happy `, `"Sad"` or `[fear]` work.
_STRIP = string.whitespace + string.punctuation


def _normalise(name: str) -> str:
  # Only the ends are cleaned: inside a name punctuation is meaningful
  # (`no-face`), and guessing at compound names would hide real typos.
  return str(name).strip(_STRIP).lower()


def canonical_expression(name: str) -> str | None:
  """Canonical expression for a dataset or folder class name.

  Args:
    name: A class name as a dataset or folder spells it, e.g. "Happy",
      "ANGER", " surprised ", "Fearful", "HA". Case and surrounding whitespace
      or punctuation do not matter.

  Returns:
    One of `contract.EXPRESSIONS`, or None for a class that is deliberately
    dropped (contempt; AffectNet's None/Uncertain/No-Face), which callers
    should skip.

  Raises:
    DataError: the name is not a known spelling of any class; the message names
      the class and the accepted names.
  """
  key = _normalise(name)
  if key in _ALIASES:
    return _ALIASES[key]
  if key in _DROPPED:
    return None
  raise DataError(
      f"unknown expression class {name!r}: use one of "
      f"{', '.join(accepted_names())} (contempt is accepted and dropped)")


def accepted_names() -> list[str]:
  """All accepted spellings (lowercase), canonical names first."""
  names = list(EXPRESSIONS)
  names += sorted(a for a in _ALIASES if a not in EXPRESSIONS)
  return names


def is_dropped(name: str) -> bool:
  """True for a known class that is deliberately dropped (e.g. contempt)."""
  return _normalise(name) in _DROPPED
