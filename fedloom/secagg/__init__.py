"""Secure aggregation (SecAgg / SecAgg+): the coordinator learns only the sum of the clients' inputs.

Transport-free: `SecAggClient` and `SecAggCoordinator` exchange the frozen dataclasses of
`fedloom.secagg.messages`; `run_secagg` plays a round in memory. See `fedloom.secagg.protocol` for the stages.
"""

from fedloom.secagg.client import SecAggClient
from fedloom.secagg.coordinator import SecAggCoordinator, SecAggResult, default_degree, harary_graph, plan_round
from fedloom.secagg.messages import (
    EncryptedShare,
    InsufficientParticipants,
    KeyAdvert,
    MaskedInput,
    ProtocolViolation,
    RevealedShare,
    RevealRefused,
    RoundSetup,
    SecAggError,
    UnmaskRequest,
    UnmaskResponse,
)
from fedloom.secagg.protocol import SimulationResult, run_secagg
from fedloom.secagg.quantize import QuantSpec, dequantize_sum, error_bound, quantize

__all__ = [
    "EncryptedShare",
    "InsufficientParticipants",
    "KeyAdvert",
    "MaskedInput",
    "ProtocolViolation",
    "QuantSpec",
    "RevealRefused",
    "RevealedShare",
    "RoundSetup",
    "SecAggClient",
    "SecAggCoordinator",
    "SecAggError",
    "SecAggResult",
    "SimulationResult",
    "UnmaskRequest",
    "UnmaskResponse",
    "default_degree",
    "dequantize_sum",
    "error_bound",
    "harary_graph",
    "plan_round",
    "quantize",
    "run_secagg",
]
