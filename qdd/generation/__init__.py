"""Generation: the generator registry, prompt sets, tiny test pipelines and the loop.

Only the registry is imported here; diffusers, torch and Lightning load on first use.
"""

from qdd.generation.registry import GENERATORS, GeneratorSpec, get_generator

__all__ = ["GENERATORS", "GeneratorSpec", "get_generator"]
