"""Interop with other ecosystems (HuggingFace PEFT)."""
