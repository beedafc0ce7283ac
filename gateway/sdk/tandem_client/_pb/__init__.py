"""Generated protobuf and gRPC modules for tandem.v1 (common, generation).

Filled when the package is built (see setup.py): copies of the repository's stubs, importing
each other from here. Not part of the public API: use tandem_client's types.
"""
