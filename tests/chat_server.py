"""A stub OpenAI-compatible chat-completions server on 127.0.0.1 for the tests (not a test module): the HTTP loop
once, each test's server a subclass saying what to answer in respond."""
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def data_url_image(url):
    """The image of a base64 data URL, as a chat request's image_url carries it (PIL, not decoded yet)."""
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def completion(model, text, prompt_tokens, completion_tokens, id="x", finish_reason="stop"):
    """A chat.completion answer with one choice."""
    return {"id": id, "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class ChatServer:
    """Serves POSTs on 127.0.0.1 (port, or a free one) from a daemon thread, each request in a thread of its own:
    respond(path, headers, body), body the parsed JSON request, gives (HTTP status, JSON payload) or (status,
    payload, extra headers); status None drops the connection without an answer. quiet: a handler's error (a
    client that timed out leaves a broken pipe) is not printed. url is the /v1 base; close() (or leaving a `with`
    block) stops it."""

    def __init__(self, port=0, quiet=False):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass  # no request lines in the test output

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload, *extra = server.respond(self.path, self.headers, body)
                if code is None:  # a dropped connection: no status line at all
                    self.close_connection = True
                    return
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra[0] if extra else {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True  # a client that hangs up cannot keep the test process alive

            def handle_error(self, request, client_address):
                if not quiet:
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, path, headers, body):
        raise NotImplementedError  # each test's server says what it answers

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
