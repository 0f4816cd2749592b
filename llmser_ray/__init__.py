"""llmser-ray: LLM-based data augmentation for sequential recommenders, on Ray."""

__version__ = "0.1.0"
