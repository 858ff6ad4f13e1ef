"""Streams that survive a dead replica (issue 12, item 14; after NVIDIA Dynamo's request migration).

The gateway asks the engine for the token ids of a stream (`return_token_ids`), keeps the prompt's
and every generated token it relayed, and when the replica breaks mid-stream re-sends prompt +
generated ids to another replica as a `/v1/completions` continuation with the remaining
`max_tokens`. The continuation's chunks are rewritten into the original stream's shape (its id,
its object, chat deltas for a chat stream) and its usage into the whole request's, so the client
sees one unbroken stream. With greedy decoding the resumed text is the unbroken run's: the
continuation's prefill computes what the dead replica's KV cache held.

Only whole events are relayed: a partial event held when the replica broke is dropped, so the
continuation starts right after the last token the client saw. Token ids the client did not ask
for are removed from what it receives.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EVENT_END = b"\n\n"
DONE = b"data: [DONE]"
ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
# What the continuation keeps of the original request: sampling, not the prompt's form.
SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "logit_bias",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "priority",
    "vllm_xargs",
)
# A stream with any of these cannot be continued from token ids alone (several choices, per-token
# logprobs, constrained or tool-calling output, echoed prompts, prompt lists).
NOT_RESUMABLE = (
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "tools",
    "functions",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
IDS_KEYS = ("prompt_token_ids", "token_ids", "prompt_text")
IDS_MARK = b'token_ids"'


def resumable(route: str, document: Mapping[str, Any]) -> bool:
    if route not in ROUTES or document.get("n") not in (None, 1):
        return False
    if any(document.get(key) not in (None, False) for key in NOT_RESUMABLE):
        return False
    prompt = document.get("prompt")
    return not (isinstance(prompt, list) and prompt and not isinstance(prompt[0], int))


def _strip_ids(document: dict[str, Any]) -> None:
    """Token ids the client did not ask for, as vLLM sends them then: present, null."""
    for holder in (document, *(c for c in document.get("choices") or () if isinstance(c, dict))):
        for key in IDS_KEYS:
            if holder.get(key) is not None:
                holder[key] = None


@dataclass(slots=True)
class StreamResume:
    """What a stream relayed so far, and how to continue it elsewhere."""

    route: str
    document: Mapping[str, Any]
    max_model_len: int
    keep_ids: bool  # the client asked for token ids itself
    fields: Mapping[str, object] = field(default_factory=dict)  # the engine fields the gateway sets
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False  # a choice reported its finish_reason
    continued: bool = False  # the current upstream is a continuation
    head: dict[str, Any] = field(default_factory=dict)  # id, object, created, model of the original
    held: bytes = b""

    @classmethod
    def for_request(
        cls, route: str, document: Mapping[str, Any], fields: Mapping[str, object], max_model_len: int
    ) -> tuple[StreamResume, dict[str, object]]:
        keep = document.get("return_token_ids") is True
        merged: dict[str, object] = {**fields, "return_token_ids": True}
        return cls(route, document, max_model_len, keep, merged), merged

    # -- relaying -------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """Whole events of the current upstream, in the client's shape; a partial one is held."""
        data = self.held + chunk if self.held else chunk
        cut = data.rfind(EVENT_END) + len(EVENT_END)
        if cut < len(EVENT_END):
            self.held = data
            return b""
        self.held = data[cut:]
        events = data[: cut - len(EVENT_END)].split(EVENT_END)
        return b"".join(self._event(event) for event in events)

    def broken(self) -> None:
        """The upstream failed: what it left half sent was never relayed, and is dropped."""
        self.held = b""

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {") or (not self.continued and IDS_MARK not in event):
            return event + EVENT_END  # [DONE], comments; an engine that sends no ids: untouched
        try:
            document = json.loads(event[6:])
        except ValueError:
            return event + EVENT_END
        if not isinstance(document, dict):
            return event + EVENT_END
        if self.prompt_ids is None:
            self._first(document)
        for choice in document.get("choices") or ():
            if isinstance(choice, dict):
                self.generated.extend(choice.get("token_ids") or ())
                if choice.get("finish_reason") is not None:
                    self.finished = True
        if self.continued:
            document = self._as_original(document)
        if not self.keep_ids:
            _strip_ids(document)
        # vLLM's own serialisation (compact, UTF-8): an unbroken stream keeps vLLM's bytes.
        text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        return b"data: " + text.encode() + EVENT_END

    def _first(self, document: dict[str, Any]) -> None:
        ids = document.get("prompt_token_ids")  # chat: top level
        choices = document.get("choices") or [{}]
        if ids is None and isinstance(choices[0], dict):
            ids = choices[0].get("prompt_token_ids")  # completions: in the choice
        if isinstance(ids, list):
            self.prompt_ids = list(ids)
            self.head = {k: document[k] for k in ("id", "object", "created", "model") if k in document}

    def _as_original(self, document: dict[str, Any]) -> dict[str, Any]:
        """A continuation chunk (completions shape) as the original stream would have sent it."""
        document.update(self.head)
        document.pop("prompt_token_ids", None)
        if self.route == "/v1/chat/completions":
            choices = []
            for choice in document.get("choices") or ():
                delta = {"content": choice.get("text", "")}
                chat = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": choice.get("finish_reason"),
                }
                if choice.get("stop_reason") is not None:
                    chat["stop_reason"] = choice["stop_reason"]
                if choice.get("token_ids") is not None:
                    chat["token_ids"] = choice["token_ids"]
                choices.append(chat)
            document["choices"] = choices
        usage = document.get("usage")
        if isinstance(usage, dict) and self.prompt_ids is not None:
            # The whole request's usage, not the continuation's (whose prompt held the output).
            completion = len(self.generated)
            usage.update(
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=completion,
                total_tokens=len(self.prompt_ids) + completion,
            )
        return document

    # -- continuing -----------------------------------------------------------------------------

    def remaining(self) -> int:
        """Tokens still to generate (0: nothing to continue)."""
        if self.prompt_ids is None:
            return 0
        doc = self.document
        cap = doc.get("max_completion_tokens") or doc.get("max_tokens")
        room = self.max_model_len - len(self.prompt_ids) - len(self.generated)
        left = room if not isinstance(cap, int) else min(room, cap - len(self.generated))
        return max(0, left)

    def continuation(self, model: str) -> bytes:
        """The `/v1/completions` body that generates the rest on another replica."""
        assert self.prompt_ids is not None
        body: dict[str, Any] = {k: self.document[k] for k in SAMPLING if k in self.document}
        min_tokens = self.document.get("min_tokens")
        if isinstance(min_tokens, int):
            body["min_tokens"] = max(0, min_tokens - len(self.generated))
        fields = self.fields
        body.update(fields)
        body.update(
            model=model,
            prompt=self.prompt_ids + self.generated,
            max_tokens=self.remaining(),
            stream=True,
            return_token_ids=True,
        )
        options = self.document.get("stream_options")
        if isinstance(options, dict) or "stream_options" in fields:
            body["stream_options"] = fields.get("stream_options", options)
        self.continued = True
        self.held = b""
        return json.dumps(body, separators=(",", ":")).encode()
