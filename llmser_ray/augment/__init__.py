"""The LLMSeR augmentation stages: candidates (CCG), SIA (LLM selection + grounding) and ARV."""
