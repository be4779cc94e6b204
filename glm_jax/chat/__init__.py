"""GLM-4.5's chat format: render conversations to prompt text (render.py), parse generated
text back into reasoning, content and tool calls (parse.py), map the format's special tokens
to ids (tokens.py), and play conversations forward with a model (session.py);
`python -m glm_jax.chat` is the interactive chat."""

from glm_jax.chat.parse import parse_assistant
from glm_jax.chat.render import ChatFormatError, Rendered, render, render_assistant_body
from glm_jax.chat.tokens import ByteChatTokenizer, HubChatTokenizer, load_chat_tokenizer, tokenize

__all__ = ["ByteChatTokenizer", "ChatFormatError", "HubChatTokenizer", "Rendered",
           "load_chat_tokenizer", "parse_assistant", "render", "render_assistant_body",
           "tokenize"]
