"""GPU implementations of the babai, klein, successive and beam decoders (Triton), as an `ojbkq` plugin."""
