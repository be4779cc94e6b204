"""GLM-4.5's chat format: render conversations to prompt text (render.py), parse generated
text back into reasoning, content and tool calls (parse.py), and map the format's special
tokens to ids (tokens.py)."""

from glm_jax.chat.render import ChatFormatError, Rendered, render, render_assistant_body

__all__ = ["ChatFormatError", "Rendered", "render", "render_assistant_body"]
