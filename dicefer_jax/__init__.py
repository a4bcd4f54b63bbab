"""dicefer-jax: DICE-FER (identity-decoupled facial expression recognition) in JAX/Flax."""

__version__ = "0.1.0"

__all__ = ("Predictor",)


def __getattr__(name):
  # `from dicefer_jax import Predictor` without making every `import
  # dicefer_jax.<module>` pay for JAX and the model code.
  if name == "Predictor":
    from dicefer_jax.predictor import Predictor  # pylint: disable=g-import-not-at-top
    return Predictor
  raise AttributeError(f"module 'dicefer_jax' has no attribute {name!r}")
