"""The client side: the Trainer protocol, the PyTorch trainer, and the node loop."""

from fedloom.client.trainer import Trainer, execute

__all__ = ["Trainer", "execute"]
