"""One instruction example (a jsonl record) -> token ids and a per-token loss mask.

Two record shapes are read:

* ``{"prompt": str, "completion": str}``: ``prompt ids + completion ids + EOS``, the completion and its EOS
  in the loss. No template is applied (Flan's inputs/targets, LLaDA's prompt/answer pairs).
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (multi-turn): formatted by the
  tokenizer's chat template (``apply_chat_template``) when it has one, else by the default below. The loss
  covers exactly the assistant turns: for turn ``i`` the span is the text that ``messages[:i + 1]`` adds to
  ``messages[:i]`` rendered with the generation prompt (the content and the template's end-of-turn marker;
  the role header stays context).

The default format (a tokenizer without a chat template, or ``chat_template="default"``), each message in
order::

    System: {content}\\n        context
    User: {content}\\n          context
    Assistant: {content}<EOS>  "Assistant: " is context; the content and EOS are in the loss

Texts are encoded with special-token strings as plain text (``MDMTokenizer.encode``), except with a chat
template, whose rendered text holds its own special tokens (content is then tokenized as the template's
text; a content that spells a special token is read as that token, as ``apply_chat_template`` does).

Loss-mask values (``uint8``): 0 context (never masked, no loss), 1 completion (assistant turns, their EOS),
2 padding in the loss (LLaDA's EOS padding, written by ``prepare_sft`` in the padded layout). Bad records
raise :class:`ExampleError` with a ``kind`` for the report.
"""

from __future__ import annotations

import numpy as np

from megatron_mdm.errors import UserError

ROLES = ("system", "user", "assistant")
CONTEXT, COMPLETION, PAD_IN_LOSS = 0, 1, 2
TEMPLATES = ("auto", "default")
KINDS = ("missing_keys", "unknown_role", "empty_completion", "too_long", "mask_token", "template")


class ExampleError(UserError, ValueError):
    """A record that cannot become an example; ``kind`` is one of ``KINDS``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def parse_record(rec) -> tuple[str, list[tuple[str, str]]]:
    """``("pc", [("user", prompt), ("assistant", completion)])`` or ``("messages", [(role, content), ...])``."""
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        msgs = []
        for j, m in enumerate(rec["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ExampleError("missing_keys", f"messages[{j}] needs string fields 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ExampleError("unknown_role", f"messages[{j}] has role {m['role']!r}, expected one of {ROLES}")
            if m["role"] == "assistant" and not m["content"].strip():
                raise ExampleError("empty_completion", f"messages[{j}] is an empty assistant turn")
            msgs.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in msgs):
            raise ExampleError("empty_completion", "no assistant turn in 'messages' (nothing to learn)")
        return "messages", msgs
    if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        if not rec["completion"].strip():
            raise ExampleError("empty_completion", "empty 'completion'")
        return "pc", [("user", rec["prompt"]), ("assistant", rec["completion"])]
    raise ExampleError("missing_keys", "expected string fields 'prompt' and 'completion', or a list 'messages' of "
                       "{'role', 'content'}")


def _default(tok, msgs: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    for role, content in msgs:
        if role == "assistant":
            head, body = tok.encode("Assistant: "), tok.encode(content) + [tok.eos_id]
            ids += head + body
            mask += [CONTEXT] * len(head) + [COMPLETION] * len(body)
        else:
            part = tok.encode(f"{role.capitalize()}: {content}\n")
            ids += part
            mask += [CONTEXT] * len(part)
    return ids, mask


def _template(tok, msgs: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    hf = tok.hf
    conv = [{"role": r, "content": c} for r, c in msgs]

    def render(n: int, gen: bool) -> str:
        return hf.apply_chat_template(conv[:n], tokenize=False, add_generation_prompt=gen)

    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, (role, _) in enumerate(msgs):
        if role == "assistant":
            head = render(i, True)
            if not head.startswith(done):
                raise ExampleError("template", "the chat template does not render the conversation prefix-stably; "
                                   "use the default format (--chat-template default)")
            piece = encode_template_text(tok, head[len(done):])
            ids += piece
            mask += [CONTEXT] * len(piece)
            done = head
        full = render(i + 1, False)
        if not full.startswith(done):
            raise ExampleError("template", "the chat template does not render the conversation prefix-stably; "
                               "use the default format (--chat-template default)")
        piece = encode_template_text(tok, full[len(done):])
        ids += piece
        mask += [COMPLETION if role == "assistant" else CONTEXT] * len(piece)
        done = full
    return ids, mask


def encode_template_text(tok, text: str) -> list[int]:
    """Ids of chat-template text (its special-token strings are special tokens)."""
    return list(tok.hf(text, add_special_tokens=False)["input_ids"]) if text else []


def has_chat_template(tok) -> bool:
    return bool(getattr(tok.hf, "chat_template", None))


def encode_example(tok, rec, chat_template: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``int64 [n]`` and loss mask ``uint8 [n]`` (values ``CONTEXT``/``COMPLETION``) of one record.

    Args:
        tok: an ``MDMTokenizer``.
        rec: the decoded jsonl record.
        chat_template: ``"auto"`` (the tokenizer's chat template for ``messages`` when it has one, else the
            default format) or ``"default"``.

    Raises:
        ExampleError: missing keys, an unknown role, an empty completion, the mask id in the ids.
    """
    if chat_template not in TEMPLATES:
        raise ValueError(f"--chat-template must be one of {TEMPLATES}, got {chat_template!r}")
    shape, msgs = parse_record(rec)
    if shape == "pc":
        p, c = tok.encode(msgs[0][1]), tok.encode(msgs[1][1]) + [tok.eos_id]
        ids, mask = p + c, [CONTEXT] * len(p) + [COMPLETION] * len(c)
    elif chat_template == "auto" and has_chat_template(tok):
        ids, mask = _template(tok, msgs)
    else:
        ids, mask = _default(tok, msgs)
    arr = np.asarray(ids, dtype=np.int64)
    if (arr == tok.mask_id).any():
        raise ExampleError("mask_token", "the example tokenizes to the mask id")
    m = np.asarray(mask, dtype=np.uint8)
    if not (m == COMPLETION).any():
        raise ExampleError("empty_completion", "the completion tokenizes to nothing")
    return arr, m


def fit_length(ids: np.ndarray, mask: np.ndarray, seq_length: int, truncate: bool) -> tuple[np.ndarray, np.ndarray]:
    """The example itself when it fits in ``seq_length``; else, with ``truncate``, context dropped from the
    left (up to the first loss token), then the tail cut; without it an ``ExampleError("too_long")``."""
    n = len(ids)
    if n <= seq_length:
        return ids, mask
    if not truncate:
        raise ExampleError("too_long", f"example of {n} tokens ({int((mask != CONTEXT).sum())} in the loss) is longer "
                           f"than --seq-length {seq_length} (--truncate cuts it instead)")
    first = int(np.argmax(mask != CONTEXT))
    left = min(n - seq_length, first)
    ids, mask = ids[left:left + seq_length], mask[left:left + seq_length]
    return ids, mask
