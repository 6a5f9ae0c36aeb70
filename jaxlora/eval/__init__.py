"""Evaluation of trained adapters: scoring rules of the study (`metrics`), kept free of model
code so they can be checked by hand and reused on any generations."""
