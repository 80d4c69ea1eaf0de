"""The decode engine: encoders once per request, a preallocated slot cache and a compiled decoder step."""

from .runner import DecodeEngine, Encoded, EngineFull, EngineOptions
from .search import BeamGroup, Group, TokenGroup

__all__ = ["BeamGroup", "DecodeEngine", "Encoded", "EngineFull", "EngineOptions", "Group", "TokenGroup"]
