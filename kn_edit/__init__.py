"""kn-edit: declarative knowledge-neuron edits (Dai et al., ACL 2022) -> verified checkpoints."""
__version__ = "0.1.0"
