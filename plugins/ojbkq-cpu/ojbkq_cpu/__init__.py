"""CPU (numba) implementations of the ojbkq babai, klein, successive and beam decoders."""
