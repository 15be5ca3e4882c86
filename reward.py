"""
reward.py: the ONE answer grammar of widematch, its parser and the verifiable reward (pure Python, no torch).

Usage (library only; imported by make_tasks.py, grpo.py, tiny_model.py, evaluate.py):
    from reward import ANSWER_INSTRUCTIONS, format_answer, parse_answer, score
    score(completion_text, task)  # -> dict(format, match, reward, precision, recall, f1, parsed, ...)

Answer grammar. Image-1 points are labelled 1..n, image-2 points A, B, ..., Z, AA, AB, ... (y_label(j)).
The completion may reason freely first; its LAST thing must be exactly one block
    <answer>
    1: C
    2: none
    3: A
    </answer>
with one line per image-1 point, "i: LABEL" or "i: none". Several points may name the same letter (the paper's
f maps into Y u {none}; it need not be one-to-one); each point is scored on its own.
Tolerated: case of tags, labels and "none"; blank lines; lines in any order; spaces around tokens; the separators
":", "-", "->", "=>", "=", ".", "→"; "none" / "∅" / "no match" for no match; trailing chat end tokens
(<|im_end|>, <|endoftext|>) after the block.
Malformed (parse_answer returns None): no block or more than one "<answer>"/"</answer>" tag anywhere (also in the
reasoning); non-whitespace text after "</answer>"; any non-blank line in the block that is not "i: LABEL|none";
index outside 1..n; label outside the m drawn labels; a point answered twice; text longer than max_chars.

Scoring decisions (score):
- r_match = (1/n) sum_i 1[f_hat(i) == f*(i)] over ALL n points, none included (paper, eq. r_match).
- Malformed -> format 0, match 0, precision = recall = f1 = 0.
- Partial (well-formed block, some points missing) -> format 0 (format needs every point answered exactly once);
  missing points count as wrong in match (also when their target is none: silence is not an answer).
- reward = w_format * format + w_match * match, so in [0, w_format + w_match] (= [0, 2] by default).
- Precision = correct non-none predictions / non-none predictions; recall = correct non-none predictions /
  non-none targets; f1 = harmonic mean, 0 when P + R = 0. Empty cases: a ratio with an empty denominator is 1
  when BOTH the non-none predictions and the non-none targets are empty (nothing to find, nothing claimed:
  perfect), and 0 otherwise (claiming matches where none exist, or finding nothing where matches exist).
  n_pred, n_correct, n_pos are returned so evaluate.py can also micro-average.
- Anti-hacking (tests show each): all-"none" earns exactly the fraction of none targets and P = R = 0 when
  matches exist; one letter repeated earns only the points it is right for; extra entries (out-of-range or
  duplicate indices) and over-long texts are malformed and earn 0; work is bounded by max_chars.
Departure from the paper: it labels both images with numbers; we use numbers vs letters so that the labels of
the two images can never be confused in text.
"""
import re

# -----------------------------------------------------------------------------
# The grammar

NONE_WORDS = ("none", "∅", "no match")   # accepted spellings of "no match" (case-insensitive)
MAX_CHARS = 32768                         # ~ the paper's 5120-token budget; longer completions are malformed

ANSWER_INSTRUCTIONS = (
    "Answer format: after your reasoning, end your reply with exactly one answer block and nothing after it:\n"
    "<answer>\n"
    "1: B\n"
    "2: none\n"
    "...\n"
    "</answer>\n"
    "Write one line per numbered point of image 1, \"number: letter\" with the letter of the matching point in "
    "image 2, or \"number: none\" if that point has no matching labelled point in image 2. "
    "Answer every numbered point exactly once."
)


def y_label(j):
    """0-based index -> letter label: 0 -> A, 25 -> Z, 26 -> AA (spreadsheet style)."""
    s = ""
    j += 1
    while j > 0:
        j, r = divmod(j - 1, 26)
        s = chr(ord("A") + r) + s
    return s


def x_labels_for(n):
    return [str(i + 1) for i in range(n)]


def y_labels_for(m):
    return [y_label(j) for j in range(m)]


def format_answer(mapping):
    """{1: "C", 2: None, ...} -> the answer block (lines sorted by point number)."""
    lines = [f"{i}: {'none' if mapping[i] is None else mapping[i]}" for i in sorted(mapping)]
    return "<answer>\n" + "\n".join(lines) + "\n</answer>"

# -----------------------------------------------------------------------------
# Parsing

_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
# index (at most 6 digits, so int() is cheap), separator, rest of the line
_LINE = re.compile(r"([0-9]{1,6})\s*(->|=>|→|:|-|=|\.)\s*(.*)", re.DOTALL)
_TRAILING_OK = re.compile(r"(?:\s|<\|im_end\|>|<\|endoftext\|>)*")


def parse_answer(text, n, m, max_chars=MAX_CHARS):
    """Completion text -> {i: label or None} for the points it answers (may be partial), or None if malformed.
    Never raises on any input; work is linear in min(len(text), max_chars)."""
    if not isinstance(text, str) or len(text) > max_chars:
        return None
    opens = [mo for mo in _OPEN.finditer(text)]
    closes = [mo for mo in _CLOSE.finditer(text)]
    if len(opens) != 1 or len(closes) != 1 or closes[0].start() < opens[0].end():
        return None
    if not _TRAILING_OK.fullmatch(text, closes[0].end()):
        return None
    valid = set(y_labels_for(m))
    mapping = {}
    for raw in text[opens[0].end():closes[0].start()].splitlines():
        line = raw.strip()
        if not line:
            continue
        mo = _LINE.fullmatch(line)
        if mo is None:
            return None
        i = int(mo.group(1))
        value = " ".join(mo.group(3).split())  # collapse inner whitespace ("no   match")
        if value.lower() in NONE_WORDS:
            label = None
        elif value.upper() in valid:
            label = value.upper()
        else:
            return None
        if not 1 <= i <= n or i in mapping:
            return None
        mapping[i] = label
    return mapping

# -----------------------------------------------------------------------------
# Scoring


def _ratio(num, den, other_den):
    """num/den; an empty denominator gives 1 only when the other side is empty too (see module docstring)."""
    if den > 0:
        return num / den
    return 1.0 if other_den == 0 else 0.0


def score(text, task, w_format=1.0, w_match=1.0, max_chars=MAX_CHARS):
    """Reward of one completion for one task (needs task n, m, target; target[i-1] is a Y label or None)."""
    n, m, target = task["n"], task["m"], task["target"]
    if n < 1 or len(target) != n:
        raise ValueError(f"score: task {task.get('task_id')} has n={n} but {len(target)} targets")
    parsed = parse_answer(text, n, m, max_chars=max_chars)
    n_pos = sum(t is not None for t in target)
    if parsed is None:
        return dict(format=0.0, match=0.0, reward=0.0, precision=0.0, recall=0.0, f1=0.0, n_pred=0,
                    n_correct=0, n_pos=n_pos, n_answered=0, malformed=True, parsed=None)
    missing = object()  # a missing point never equals any target, none included
    hits = [parsed.get(i + 1, missing) == target[i] for i in range(n)]
    n_pred = sum(v is not None for v in parsed.values())
    n_correct = sum(parsed.get(i + 1) is not None and hits[i] for i in range(n))
    precision = _ratio(n_correct, n_pred, n_pos)
    recall = _ratio(n_correct, n_pos, n_pred)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    fmt = 1.0 if len(parsed) == n else 0.0
    match = sum(hits) / n
    return dict(format=fmt, match=match, reward=w_format * fmt + w_match * match, precision=precision,
                recall=recall, f1=f1, n_pred=n_pred, n_correct=n_correct, n_pos=n_pos, n_answered=len(parsed),
                malformed=False, parsed=parsed)
