"""dicefer-jax: DICE-FER (identity-decoupled facial expression recognition) in JAX/Flax."""

__version__ = "0.1.0"
