"""A tiny random Llama with the embedded SmolLM2 tokenizer, saved as a local model folder.

Load and server tests use it so that a forward pass costs about a millisecond: the wire format,
the vocabulary (49152) and the chat template are the real ones, the weights are random (seeded).
"""
import os

TINY_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def make_tiny_model(folder: str, seed: int = 0) -> str:
    """Write the tiny model to ``folder`` once (config.json marks it done); returns ``folder``."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from costeer.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.5, **TINY_CONFIG)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    os.makedirs(folder, exist_ok=True)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)  # config.json last-ish; a half-written folder is rebuilt by the caller
    return folder


class ServerThread:
    """``costeer.serve.server.serve_forever`` on 127.0.0.1 (free port) in a background thread.

    ``server`` is the ``LLMServer`` (its ``registry`` holds the live sessions); ``url`` its address
    (``wss://`` with ``ssl_context``).
    """

    def __init__(self, loaded, *, host="127.0.0.1", token=None, max_frame_bytes=4 * 2**20, max_connections=256,
                 send_timeout=30.0, tick=None, ssl_context=None, **server_kw):
        import asyncio
        import threading

        from costeer.serve.server import LLMServer, serve_forever

        self.server = LLMServer(loaded, **server_kw)
        self._ready = threading.Event()
        self._error = None
        self.url = None

        def ready(h, p):
            self.url = f"{'wss' if ssl_context else 'ws'}://{h}:{p}"
            self._ready.set()

        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve_forever(self.server, host, 0, max_frame_bytes=max_frame_bytes, ready=ready, stop=self._stop,
                                token=token, max_connections=max_connections, send_timeout=send_timeout, tick=tick,
                                ssl_context=ssl_context)

        def run():
            try:
                asyncio.run(main())
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=run, daemon=True, name="costeer-test-server")
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        if self.url is None:
            raise RuntimeError("the test server did not start")

    def call(self, fn):
        """Run ``fn()`` on the server's event loop thread and return its result."""
        import concurrent.futures

        fut = concurrent.futures.Future()

        def go():
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(go)
        return fut.result(30)

    def close(self):
        if self._error is None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        self.server.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
