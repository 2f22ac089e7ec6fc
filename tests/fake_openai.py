"""A local OpenAI-compatible chat server for tests: scripted failures, counted calls."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    """Answers POST /v1/chat/completions. `script` is consumed one action per request:
    "ok", "429", "500", "401", "403", "404" (no such model), "drop", "malformed", "prose", "refuse",
    "empty"; when empty, "ok". GET /v1/models answers with `models_status` (200, 401, or any error), counted in
    `model_requests`, apart from the chat requests.
    A verdict is compliant when the judged response contains "COMPLY", or the word a policy names on a line
    "Compliant mark: WORD" (policies that differ, for a chain of policy shifts). Classification answers the first
    allowed label the prompt mentions; written responses contain "COMPLY" when told to do what was asked.
    Asked to choose among responses A, B, ..., it picks the one response that contains "COMPLY", else "tie"
    ("malformed" and "prose" script actions answer something no strict reader accepts)."""

    def __init__(self, latency: float = 0.0, schema_supported: bool = True, json_mode_supported: bool = True):
        self.script: list[str] = []
        self.latency, self.schema_supported, self.json_mode_supported = latency, schema_supported, json_mode_supported
        self.requests: list[dict] = []
        self.models_status = 200
        self.model_requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if not self.path.rstrip("/").endswith("/models"):
                    return self._send(404, {"error": {"message": "no such endpoint"}})
                with fake.lock:
                    fake.model_requests.append({"auth": self.headers.get("Authorization")})
                if fake.models_status == 401:
                    return self._send(401, {"error": {"message": "Incorrect API key provided: sk-pla***", "code": "invalid_api_key"}})
                if fake.models_status != 200:
                    return self._send(fake.models_status, {"error": {"message": "not here"}})
                self._send(200, {"object": "list", "data": [{"id": "judge", "object": "model", "created": 0, "owned_by": "x"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    action = fake.script.pop(0) if fake.script else "ok"
                time.sleep(fake.latency)
                fmt = (body.get("response_format") or {}).get("type")
                if fmt == "json_schema" and not fake.schema_supported:
                    return self._send(400, {"error": {"message": "response_format json_schema is not supported"}})
                if fmt == "json_object" and not fake.json_mode_supported:
                    return self._send(400, {"error": {"message": "response_format json_object is not supported"}})
                if action == "429":
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.01"})
                if action == "500":
                    return self._send(500, {"error": {"message": "boom"}})
                if action in ("401", "403"):
                    return self._send(int(action), {"error": {"message": "Incorrect API key provided: sk-pla***",
                                                              "code": "invalid_api_key"}})
                if action == "404":
                    return self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist or you "
                                                                 "do not have access to it.", "code": "model_not_found"}})
                if action == "drop":
                    self.connection.close()
                    return
                user = body["messages"][-1]["content"]
                system = body["messages"][0]["content"]
                named = re.search(r"Compliant mark: (\w+)", user.split("Prompt:", 1)[0])
                mark = named.group(1) if named else "COMPLY"
                if system.startswith("Classify the user prompt"):
                    # the first allowed label the prompt mentions, else the last label ("none")
                    labels = user.split("Allowed labels: ", 1)[1].split("\n", 1)[0].split(", ")
                    prompt = user.split("Prompt:\n", 1)[1].lower()
                    label = next((lab for lab in labels if lab in prompt), labels[-1])
                    return self._reply(body, {"role": "assistant", "content": json.dumps({"label": label})})
                if system.startswith("You compare AI assistant responses"):
                    answers = user.split("Allowed answers: ", 1)[1].split("\n", 1)[0].split(", ")
                    shown = user.split("\n\nResponse ")[1:]
                    best = [r.split(":", 1)[0] for r in shown if mark in r]
                    choice = best[0] if len(best) == 1 else answers[-1]
                    content = {"ok": json.dumps({"choice": choice}), "malformed": '{"choice": maybe',
                               "prose": f"Response {choice} follows the policy best.", "empty": "", "refuse": None}[action]
                    message = {"role": "assistant", "content": content}
                    if action == "refuse":
                        message["refusal"] = "I cannot judge this."
                    return self._reply(body, message)
                if "following the instruction exactly" in system:
                    # a written response that names its instruction's stance; "Do what the prompt asks"
                    # (comply, caveat) reads as compliant to this server's judge
                    instruction = user.split("Instruction:\n", 1)[1]
                    if "WRITEFAIL" in user:
                        return self._reply(body, {"role": "assistant", "content": ""})
                    stance = instruction.split(". ", 1)[-1][:50]  # the stance sentence, after the axis one
                    text = ("COMPLY: here is how. " if "Do what the prompt asks" in instruction else "No: ") + stance
                    return self._reply(body, {"role": "assistant", "content": text})
                if "Write the assistant's reply" in system:
                    # BADFIX prompts never get a good correction; FLAKY ones only from the second attempt on
                    bad = "BADFIX" in user or ("FLAKY" in user and "(attempt 1)" in user)
                    text = "no good" if bad else f"{mark}: a balanced answer."
                    return self._reply(body, {"role": "assistant", "content": text})
                if "Response A:" in user:
                    a, b = user.split("Response A:", 1)[1].split("Response B:", 1)
                    content = json.dumps({"a_compliant": mark in a, "b_compliant": mark in b, "rationale": "x"})
                    return self._reply(body, {"role": "assistant", "content": content})
                verdict = mark in user.split("Response:", 1)[-1]
                content = {
                    "ok": json.dumps({"compliant": verdict, "rationale": "checked"}),
                    "malformed": '{"compliant": maybe',
                    "prose": "The response is compliant with the policy." if verdict else "It violates the policy.",
                    "refuse": None,
                    "empty": "",
                }[action]
                message = {"role": "assistant", "content": content}
                if action == "refuse":
                    message["refusal"] = "I cannot judge this."
                self._reply(body, message)

            def _reply(self, body, message):
                self._send(200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                })

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # many concurrent clients: do not refuse connections at the door
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that timed out and hung up is part of the tests

        self.server = Server(("127.0.0.1", 0), Handler)
        # A path of its own: a server started after another closed may get its port, and cache keys name the
        # server, so without it a test could read another test's answers and never ask this one.
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{uuid.uuid4().hex[:12]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
