"""``gptlab chat``: a browser chat page for any Ollama-API server (``gptlab serve`` or a real Ollama).

Outside the core library: it needs the ``chat`` extra (Gradio, the ``ollama`` client). :mod:`gptlab.chatui.backend`
talks to the server (models, streamed chat, errors as one-line messages); :mod:`gptlab.chatui.app` is the Gradio page.

Gradio is configured to work offline: no analytics or version checks (``GRADIO_ANALYTICS_ENABLED``), no
server-side rendering (it needs Node), and system fonts instead of Google Fonts (see :mod:`gptlab.chatui.app`).
"""

import os

# Read when gradio is imported: set before chatui.app imports it (a user's own setting wins).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
