"""Tandem's protobuf contracts. Regenerate the stubs with `python -m protos.generate`."""
