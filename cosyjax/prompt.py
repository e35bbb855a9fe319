"""The prompt class (`cosyjax.frontend.prompt.Prompt`, also exported as `PrecomputedPrompt`)."""
from cosyjax.frontend.prompt import PrecomputedPrompt, Prompt, PromptError, is_prompt_npz

__all__ = ["Prompt", "PrecomputedPrompt", "PromptError", "is_prompt_npz"]
