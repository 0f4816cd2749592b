"""The generation layer: chat requests in, verbatim replies with a status out (docs/LLM.md)."""

from llmser_ray.llm.generate import generate, generate_rows
from llmser_ray.llm.models import resolve_llm

__all__ = ["generate", "generate_rows", "resolve_llm"]
