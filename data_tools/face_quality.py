"""Which detected face of a photo preprocessing keeps: now `dicefer_jax.face_quality`.

The rules moved into the library so that prediction (`dicefer_jax.Predictor`)
cuts faces through the same code as preprocessing; the names stay importable
from here for the tools, benchmarks and existing scripts.
"""

# pylint: disable=unused-import
from dicefer_jax.face_quality import AlignedFace
from dicefer_jax.face_quality import check_face
from dicefer_jax.face_quality import decide
from dicefer_jax.face_quality import Decision
from dicefer_jax.face_quality import DEFAULT_MAX_DISTORTION
from dicefer_jax.face_quality import detect_and_align
from dicefer_jax.face_quality import detect_and_align_all
from dicefer_jax.face_quality import DISTORTED
from dicefer_jax.face_quality import ERROR
from dicefer_jax.face_quality import IMPLAUSIBLE
from dicefer_jax.face_quality import KEPT
from dicefer_jax.face_quality import LOW_PROBABILITY
from dicefer_jax.face_quality import make_detector
from dicefer_jax.face_quality import MISSING
from dicefer_jax.face_quality import MULTI_FACE_POLICIES
from dicefer_jax.face_quality import NO_FACE
from dicefer_jax.face_quality import REJECTED
from dicefer_jax.face_quality import SEVERAL_FACES
from dicefer_jax.face_quality import Settings
from dicefer_jax.face_quality import TOO_SMALL
from dicefer_jax.face_quality import UNREADABLE
