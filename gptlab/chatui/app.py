"""The chat page (Gradio Blocks, https://www.gradio.app/docs/gradio/blocks), after the book's bonus chat UIs
(ch05/06_user_interface, ch07/06_user_interface) but talking to a server over the Ollama API instead of
loading a model itself: ``gptlab serve`` or a real Ollama.

The page: a model picker filled from ``/api/tags`` (Refresh re-reads it), temperature / top-k / max-token
controls (Ollama's ``temperature``, ``top_k``, ``num_predict``), the conversation (every turn sends the whole
history to ``/api/chat``, and the reply streams in), Clear, and a status line that says in words when the
server is down or the model is missing. Offline: system fonts (Gradio's default theme links Google Fonts),
no analytics (see :mod:`chatui`), no server-side rendering, no share link.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from gptlab.chatui.backend import Backend, Options, ServerError

TITLE = "gptlab chat"
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]

Message = dict[str, str]


def _status(text: str, error: bool = False) -> str:
    return f"**Error:** {text}" if error else text


def _connected(backend: Backend, names: list[str]) -> str:
    return f"Connected to {backend.url}, serving {len(names)} model(s): {', '.join(names)}"


def build_app(backend: Backend, defaults: Options | None = None) -> gr.Blocks:
    defaults = defaults or Options()

    def refresh(current: str | None) -> tuple[Any, str]:
        try:
            names = backend.models()
        except ServerError as exc:
            return gr.update(choices=[], value=None), _status(str(exc), error=True)
        if not names:
            return gr.update(choices=[], value=None), _status(
                f"The server at {backend.url} serves no models.", True
            )
        value = current if current in names else names[0]
        return gr.update(choices=names, value=value), _connected(backend, names)

    def send(
        text: str,
        history: list[Message],
        model: str | None,
        temperature: float,
        top_k: float,
        num_predict: float,
    ) -> Iterator[tuple[list[Message], list[Message], str, str]]:
        if not text.strip():
            yield history, history, text, gr.skip()
            return
        if not model:
            yield history, history, text, _status("No model selected: press Refresh and pick one.", True)
            return
        turn = [*history, {"role": "user", "content": text}]
        reply = ""
        yield [*turn, {"role": "assistant", "content": reply}], history, "", f"`{model}` is answering…"
        options = Options(temperature=temperature, top_k=int(top_k), num_predict=int(num_predict))
        try:
            for piece in backend.chat(model, turn, options):
                reply += piece
                yield [*turn, {"role": "assistant", "content": reply}], history, "", gr.skip()
        except ServerError as exc:
            # The failed turn is not kept: the message goes back into the box to send again.
            yield history, history, text, _status(str(exc), error=True)
            return
        done = [*turn, {"role": "assistant", "content": reply}]
        yield done, done, "", f"`{model}` answered (turn {len(done) // 2})."

    def clear() -> tuple[list[Message], list[Message], str]:
        return [], [], gr.skip()

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\nTalking to `{backend.url}` over the Ollama API.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                # No "share" button: it posts to Hugging Face Spaces.
                chatbot = gr.Chatbot(
                    elem_id="chat",
                    label="Conversation",
                    height=540,
                    feedback_options=None,
                    buttons=["copy", "copy_all"],
                )
                with gr.Row():
                    box = gr.Textbox(
                        elem_id="prompt",
                        placeholder="Message the model (Enter sends)",
                        show_label=False,
                        scale=5,
                    )
                    send_btn = gr.Button("Send", elem_id="send", variant="primary", scale=1)
            with gr.Column(scale=1):
                model = gr.Dropdown(label="Model", choices=[], elem_id="model", interactive=True)
                refresh_btn = gr.Button("Refresh models", elem_id="refresh")
                temperature = gr.Slider(
                    0.0,
                    2.0,
                    value=defaults.temperature,
                    step=0.05,
                    label="Temperature (0 = greedy)",
                    elem_id="temperature",
                )
                top_k = gr.Slider(
                    0, 200, value=defaults.top_k, step=1, label="Top-k (0 = off)", elem_id="top_k"
                )
                num_predict = gr.Slider(
                    1, 2048, value=defaults.num_predict, step=1, label="Max tokens", elem_id="num_predict"
                )
                clear_btn = gr.Button("Clear conversation", elem_id="clear")
        status = gr.Markdown("Connecting…", elem_id="status")

        app.load(refresh, inputs=[model], outputs=[model, status])
        refresh_btn.click(refresh, inputs=[model], outputs=[model, status])
        inputs = [box, history, model, temperature, top_k, num_predict]
        outputs = [chatbot, history, box, status]
        box.submit(send, inputs, outputs)
        send_btn.click(send, inputs, outputs)
        clear_btn.click(clear, outputs=[chatbot, history, status])
        chatbot.clear(lambda: [], outputs=[history])  # the conversation's own trash button
    return app


def run(server: str, host: str = "127.0.0.1", port: int = 8501, open_browser: bool = True) -> None:
    """Serve the page until interrupted (``gptlab chat``)."""
    app = build_app(Backend(server))
    app.queue(default_concurrency_limit=8).launch(
        server_name=host,
        server_port=port,
        inbrowser=open_browser,
        share=False,
        ssr_mode=False,  # server-side rendering runs a Node process
        footer_links=[],
        theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS),
        quiet=False,
    )
