"""The OpenAI-compatible chat-completions client of evaluate.py --api-base (docs/evaluate.md, "A model behind an
OpenAI-compatible endpoint"): one request per task (api_request), our own retry loop around it (api_answer: the
client's is off), the completion read into row fields (api_completion) and --api-workers requests in flight
(answerer). openai is imported only when a request is made.
"""

import base64
import json
import mimetypes
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

from widematch.answers import one_line


def data_url(path, prog="evaluate.py"):
    """The image file's bytes, unchanged, as a data URL (no re-encoding: the server, or human.py's page, shows what
    our model sees). prog names the script in the error."""
    mime = mimetypes.guess_type(path.name)[0]
    if mime not in ("image/jpeg", "image/png"):
        sys.exit(f"{prog}: error: {path} is not a .jpg or .png image (only those are sent as data URLs)")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def api_request(task, tasks_dir, args, extra=None):
    """One task's chat-completions body: one user message, the prompted images then the prompt's text (the
    order model_io.encode gives our own model), decoding settings from the flags; extra: fields outside OpenAI's
    protocol (vllm_decoding), sent as the client's extra_body."""
    content = [{"type": "image_url", "image_url": {"url": data_url(tasks_dir / p)}} for p in task["images"]]
    return request_body(args, [{"role": "user", "content": content + [{"type": "text", "text": task["prompt"]}]}],
                        extra)


def request_body(args, messages, extra=None):
    """The body around the messages: --api-model, --max-new-tokens as --api-max-tokens-param, --temperature
    unless --api-no-temperature, and extra (fields outside OpenAI's protocol) as the client's extra_body."""
    body = dict(model=args.api_model, messages=messages)
    body[args.api_max_tokens_param] = args.max_new_tokens
    if not args.api_no_temperature:
        body["temperature"] = args.temperature
    if extra:
        body["extra_body"] = extra
    return body


class ApiStopped(Exception):
    """Another request failed for good: this one gives up instead of retrying."""


def api_answer(client, task, body, args, stop, tokenizer=None):
    """Our retry loop around one request (the client itself never retries): 429, 5xx, 408/409, timeouts and
    dropped connections back off (--api-backoff doubling, capped at 60 s, Retry-After honoured up to that cap)
    and retry up to --api-retries times; anything else, or no luck after the retries, exits with one line."""
    import openai  # slow to import: only when an API model is evaluated
    base, tid = args.api_base, task["task_id"]
    for attempt in range(args.api_retries + 1):
        if stop.is_set():
            raise ApiStopped
        wait = min(args.api_backoff * 2 ** attempt, 60.0)
        try:
            resp = client.chat.completions.create(**body)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            sys.exit(f"evaluate.py: error: {base} refused the key in ${args.api_key_env} "
                     f"(HTTP {e.status_code}: {one_line(e.message)})")
        except openai.APIStatusError as e:
            if e.status_code not in (408, 409, 429) and e.status_code < 500:
                sys.exit(f"evaluate.py: error: {base} rejected the request for task {tid} (HTTP {e.status_code}: "
                         f"{one_line(e.message)}); if it is the temperature or the token limit, see "
                         "--api-no-temperature and --api-max-tokens-param")
            cause = f"HTTP {e.status_code} ({one_line(e.message, 120)})"
            retry_after = e.response.headers.get("retry-after", "")
            if re.fullmatch(r"\d+(\.\d+)?", retry_after.strip()):
                wait = min(max(wait, float(retry_after)), 60.0)
        except openai.APITimeoutError:  # before APIConnectionError: it is one
            cause = f"no answer within --api-timeout {args.api_timeout:g} s"
        except openai.APIConnectionError as e:
            cause = f"cannot connect ({one_line(e.__cause__ or e, 120)})"
        except (json.JSONDecodeError, openai.APIResponseValidationError) as e:
            sys.exit(f"evaluate.py: error: {base} sent a malformed response for task {tid} ({one_line(e, 120)})")
        else:
            return api_completion(resp, base, tid, tokenizer)
        if attempt < args.api_retries:
            stop.wait(wait)
    sys.exit(f"evaluate.py: error: {base} still failing after {args.api_retries + 1} attempts: {cause}; "
             "rerun the same command to resume")


def api_completion(resp, base, tid, tokenizer=None):
    """Row fields of a chat completion: text, truncated (finish_reason "length"), finish_reason, usage. With a
    tokenizer (--api-tokenizer) the text is its decoding of the completion's token ids, as the local path's."""
    choices = getattr(resp, "choices", None)
    message = choices[0].message if isinstance(choices, list) and choices else None
    if message is None or not isinstance(message.content, (str, type(None))):
        what = "not a chat completion" if choices is None else "no choices[0].message with text content"
        sys.exit(f"evaluate.py: error: {base} sent a malformed response for task {tid} ({what})")
    u = getattr(resp, "usage", None)
    usage = None
    if u is not None and isinstance(u.prompt_tokens, int) and isinstance(u.completion_tokens, int):
        usage = dict(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens)
    reason = choices[0].finish_reason
    text = message.content or ""
    if tokenizer is not None:
        ids = getattr(choices[0], "token_ids", None)
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            sys.exit(f"evaluate.py: error: {base} sent no token_ids for task {tid}: --api-tokenizer needs a vLLM "
                     "server (return_token_ids is vLLM's field)")
        text = tokenizer.decode(ids, skip_special_tokens=True)
    return dict(text=text, truncated=reason == "length", finish_reason=reason,
                n_tokens=usage and usage["completion_tokens"], usage=usage)


def answerer(tasks_dir, args, key, request=api_request, tokenizer=None, extra=None):
    """Stream of (task, answer) in the order the answers arrive, --api-workers requests in flight. When one
    request fails for good the others stop, the answers already back are still handed out (written), then its
    one-line error is raised: a rerun resumes from what was written. request: the body builder (api_request;
    the --reasonmatch route passes the released protocol's); tokenizer, extra: evaluate.vllm_decoding's
    (--api-tokenizer), else None."""
    import openai  # slow to import: only when an API model is evaluated
    client = openai.OpenAI(base_url=args.api_base, api_key=key, max_retries=0, timeout=args.api_timeout)

    def ask(task, stop):
        if stop.is_set():
            raise ApiStopped
        try:
            return api_answer(client, task, request(task, tasks_dir, args, extra), args, stop, tokenizer)
        except (Exception, SystemExit):  # re-raised; stopping here, in the worker, means no queued request
            stop.set()                   # starts before the main thread hears of the failure (a race before)
            raise

    def stream(todo):
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=args.api_workers)
        jobs = {pool.submit(ask, t, stop): t for t in todo}
        error = None
        try:
            for fut in as_completed(jobs):
                if isinstance(fut.exception(), ApiStopped):
                    continue
                if fut.exception() is not None:
                    if error is None:  # the first failure is the one reported; the queued requests stop at once
                        error = fut.exception()  # (not cancel_futures: as_completed never hears of those)
                        stop.set()
                    continue
                yield jobs[fut], fut.result()
        finally:  # also when the caller stops early (Ctrl-C): nothing more is asked
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        if error is not None:
            raise error
    return stream
