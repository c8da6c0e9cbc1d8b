"""fedloom: federated and distributed training.

A coordinator aggregates the updates that client nodes send over gRPC; nodes
train with PyTorch on data that never leaves them; Ray simulates many clients.
"""

from fedloom.client.trainer import Trainer
from fedloom.codec import Decoder, decode, encode
from fedloom.fleet import Fleet, InProcessFleet
from fedloom.server.driver import Driver, RunConfig
from fedloom.simulations import simulate
from fedloom.strategies import Strategy, UniformSampler, fedavg
from fedloom.tensors import NamedTensors, TensorError
from fedloom.types import EvalRes, Failure, FitRes, History, Instruction, RoundRecord

__version__ = "0.1.0"

__all__ = [
    "Decoder",
    "Driver",
    "EvalRes",
    "Failure",
    "FitRes",
    "Fleet",
    "History",
    "InProcessFleet",
    "Instruction",
    "NamedTensors",
    "RoundRecord",
    "RunConfig",
    "Strategy",
    "TensorError",
    "Trainer",
    "UniformSampler",
    "decode",
    "encode",
    "fedavg",
    "simulate",
]
