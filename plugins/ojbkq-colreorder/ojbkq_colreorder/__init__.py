"""ojbkq plugin `colreorder`: registers the `sorted-babai` decoder through the `register_decoders` hook."""
from ojbkq_core.hookspecs import hookimpl

from .sorted_babai import SortedBabai


@hookimpl
def register_decoders(register):
    register(SortedBabai)
