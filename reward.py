"""
reward.py: the ONE task language of widematch (the released ReasonMatch-Bench's), its parser and the verifiable
reward (pure Python, no torch).

Usage (library only; imported by make_tasks.py, grpo.py, tiny_model.py, evaluate.py, export_bench.py, human.py):
    from reward import format_answer, parse_answer, score
    score(completion_text, task)  # -> dict(format, match, reward, precision, recall, f1, released_*, parsed, ...)
    score(completion_text, task, w_action=0.5)  # + HATCH ActoR action reward (action block; see the ActoR section)
    released_reward(completion_text, task)      # the released training reward (see "The released rules")
    canonical_actions(R, t), format_actions(actions), parse_actions(text), action_reward(text, R, t)

In: a completion's text and a make_tasks.py task. Out: the dict above; reward = w_format * format + w_match * match
(in [0, 2] by default), r_match = (1/n) sum_i 1[f_hat(i) == f*(i)] over all n points, none included;
a malformed answer scores 0. The answer: one <thinking> block, then one <answer> block holding a JSON object that
maps every image-1 id to an image-2 id or "none".

Details: docs/tasks.md, "reward.py in full" (the answer grammar, what is tolerated and what is malformed, every
scoring decision, P/R/F1 and their empty cases, the released scorer, anti-hacking).
"""
import json
import math
import re

# -----------------------------------------------------------------------------
# The grammar

NONE_WORDS = ("none", "∅", "no match")   # accepted spellings of "no match" (case-insensitive), besides null
MAX_CHARS = 32768                         # ~ the paper's 5120-token budget; longer completions are malformed


def x_labels_for(n):
    return [str(i + 1) for i in range(n)]


def y_labels_for(m):
    return [str(j + 1) for j in range(m)]


def answer_json(mapping):
    """{1: "3", 2: None, ...} -> the JSON object text, keys in point order, none as "none" (the released truth's
    spelling, so the released scorers read it the same way)."""
    return json.dumps({str(i): "none" if mapping[i] is None else str(mapping[i]) for i in sorted(mapping)})


def format_answer(mapping, thinking=""):
    """{1: "3", 2: None, ...} -> a whole well-formed reply: the thinking block (thinking=None: none, for prompts
    that ask for the answer only) and the answer block with the fenced JSON object."""
    block = "<answer>\n```json\n" + answer_json(mapping) + "\n```\n</answer>"
    return block if thinking is None else f"<thinking>\n{thinking}\n</thinking>\n{block}"

def reference_answer(target):
    """The answer block that scores 100 for a target list (image-2 id or None per image-1 point), without a
    thinking block: the exports' "answer" field, and what evaluate.py checks harness logs against."""
    return format_answer({i + 1: v for i, v in enumerate(target)}, thinking=None)

# -----------------------------------------------------------------------------
# Parsing

_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<\s*thinking\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*/\s*thinking\s*>", re.IGNORECASE)
_TRAILING_OK = re.compile(r"(?:\s|<\|im_end\|>|<\|endoftext\|>)*")
_FENCED = re.compile(r"\s*```(?:json)?(.*?)```\s*", re.IGNORECASE | re.DOTALL)
# quotes, escapes and bare words "none": one linear scan finds the nones outside JSON strings
_QUOTE_OR_NONE = re.compile(r'\\.|"|(?<!\w)none(?!\w)', re.IGNORECASE | re.DOTALL)
_ID = re.compile(r"[0-9]{1,6}")  # at most 6 digits, so int() is cheap


class _Malformed(Exception):
    pass


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Malformed
    return dict(pairs)


def _bare_none_to_null(s):
    """An unquoted none / None (not valid JSON, but models write it) -> null; linear, strings untouched."""
    out, last, in_string = [], 0, False
    for mo in _QUOTE_OR_NONE.finditer(s):
        tok = mo.group(0)
        if tok == '"':
            in_string = not in_string
        elif tok[0] != "\\" and not in_string:
            out += [s[last:mo.start()], "null"]
            last = mo.end()
    return "".join(out) + s[last:]


def _id(v, top):
    """A JSON id value -> its string "1".."top", else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return str(v) if 1 <= v <= top else None
    if isinstance(v, str) and _ID.fullmatch(v.strip()) and 1 <= int(v.strip()) <= top:
        return str(int(v.strip()))
    return None


def parse_answer(text, n, m, max_chars=MAX_CHARS):
    """Completion text -> {i: image-2 id string or None} for the points it answers (may be partial), or None if
    malformed. Never raises on any input; work is linear in min(len(text), max_chars)."""
    if not isinstance(text, str) or len(text) > max_chars:
        return None
    opens, closes = list(_OPEN.finditer(text)), list(_CLOSE.finditer(text))
    if len(opens) != 1 or len(closes) != 1 or closes[0].start() < opens[0].end():
        return None
    if not _TRAILING_OK.fullmatch(text, closes[0].end()):
        return None
    body = text[opens[0].end():closes[0].start()]
    fenced = _FENCED.fullmatch(body)
    body = fenced.group(1) if fenced else body
    body = _bare_none_to_null(body)
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates)
    except (_Malformed, ValueError, RecursionError):  # JSONDecodeError and the int-digit limit are ValueErrors
        return None
    if not isinstance(obj, dict):
        return None
    mapping = {}
    for key, value in obj.items():
        i = _id(key, n)
        if i is None or int(i) in mapping:  # " 1" and "1" are the same point answered twice
            return None
        if value is None or (isinstance(value, str) and " ".join(value.split()).lower() in NONE_WORDS):
            mapping[int(i)] = None
        elif _id(value, m) is not None:
            mapping[int(i)] = _id(value, m)
        else:
            return None
    return mapping


def block_before_answer(text, open_re, close_re, max_chars=MAX_CHARS):
    """(start, end) of the inside of the reply's one open_re ... close_re block, when there is exactly one opening,
    one closing after it, and the block closes before the first <answer>; None otherwise (or for a non-string or
    one over max_chars). The thinking block and ActoR's action block share this rule."""
    if not isinstance(text, str) or len(text) > max_chars:
        return None
    opens, closes = list(open_re.finditer(text)), list(close_re.finditer(text))
    if len(opens) != 1 or len(closes) != 1 or closes[0].start() < opens[0].end():
        return None
    answer = _OPEN.search(text)
    if answer is not None and answer.start() < closes[0].end():
        return None
    return opens[0].end(), closes[0].start()


def has_thinking(text, max_chars=MAX_CHARS):
    """True when the reply has exactly one <thinking>...</thinking> block, closed before the answer block."""
    return block_before_answer(text, _THINK_OPEN, _THINK_CLOSE, max_chars) is not None

# -----------------------------------------------------------------------------
# Scoring


def _ratio(num, den, other_den):
    """num/den; an empty denominator gives 1 only when the other side is empty too (see module docstring)."""
    if den > 0:
        return num / den
    return 1.0 if other_den == 0 else 0.0


def prf(n_correct, n_pred, n_pos):
    """(precision, recall, f1) from link counts: correct non-none predictions, non-none predictions, non-none
    targets; the empty cases as the module docstring says. evaluate.py pools counts over tasks through it too."""
    precision = _ratio(n_correct, n_pred, n_pos)
    recall = _ratio(n_correct, n_pos, n_pred)
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0)


def released_scores(text, task, max_chars=MAX_CHARS):
    """The released benchmark's (precision, recall, f1) of one reply, as score() reports them beside ours."""
    if not isinstance(text, str) or len(text) > max_chars:
        return 0.0, 0.0, 0.0
    return released_prf(released_truth(task), released_json(text)[1])


def score(text, task, w_format=1.0, w_match=1.0, max_chars=MAX_CHARS, w_action=0.0, action_tol=None, think=True):
    """Reward of one completion for one task (needs task n, m, target; target[i-1] is an image-2 id string or
    None). think: format needs the thinking block (False for answer-only prompts).
    w_action > 0 (ActoR): also action, yaw_ok, pitch_ok, roll_ok, move_ok, action_parsed from action_reward and
    reward += w_action * action, where the task has R and t (otherwise action is None and nothing is added);
    action_tol: the angle tolerance in degrees (None: ACTION_STEP_DEG)."""
    if w_action > 0:
        d = score(text, task, w_format=w_format, w_match=w_match, max_chars=max_chars, think=think)
        if task.get("R") is None or task.get("t") is None:
            return dict(d, action=None, yaw_ok=None, pitch_ok=None, roll_ok=None, move_ok=None, action_parsed=None)
        a = action_reward(text, task["R"], task["t"], max_chars=max_chars,
                          tol_deg=ACTION_STEP_DEG if action_tol is None else action_tol)
        a["action_parsed"] = a.pop("parsed")
        return dict(d, **a, reward=d["reward"] + w_action * a["action"])
    n, m, target = task["n"], task["m"], task["target"]
    if n < 1 or len(target) != n:
        raise ValueError(f"score: task {task.get('task_id')} has n={n} but {len(target)} targets")
    target = [None if t is None else str(t) for t in target]
    rp, rr, rf = released_scores(text, task, max_chars=max_chars)
    released = dict(released_precision=rp, released_recall=rr, released_f1=rf)
    parsed = parse_answer(text, n, m, max_chars=max_chars)
    n_pos = sum(t is not None for t in target)
    if parsed is None:
        return dict(format=0.0, match=0.0, reward=0.0, precision=0.0, recall=0.0, f1=0.0, **released, n_pred=0,
                    n_correct=0, n_pos=n_pos, n_hits=0, n_answered=0, malformed=True, parsed=None)
    missing = object()  # a missing point never equals any target, none included
    hits = [parsed.get(i + 1, missing) == target[i] for i in range(n)]
    n_pred = sum(v is not None for v in parsed.values())
    n_correct = sum(parsed.get(i + 1) is not None and hits[i] for i in range(n))
    precision, recall, f1 = prf(n_correct, n_pred, n_pos)
    fmt = 1.0 if len(parsed) == n and (not think or has_thinking(text, max_chars)) else 0.0
    match = sum(hits) / n
    return dict(format=fmt, match=match, reward=w_format * fmt + w_match * match, precision=precision,
                recall=recall, f1=f1, **released, n_pred=n_pred, n_correct=n_correct, n_pos=n_pos,
                n_hits=sum(hits), n_answered=len(parsed), malformed=False, parsed=parsed)

# -----------------------------------------------------------------------------
# ActoR (HATCH): the camera-motion action block, written before the answer block
#
# Pose convention (the pool's R, t): x2 = R x1 + t maps camera-1 coordinates to camera-2 coordinates, OpenCV
# camera axes (x right, y down, z forward). Camera 2's orientation in camera 1's frame is M = R^T (its columns are
# camera 2's axes in camera-1 coordinates) and camera 2's centre in camera-1 coordinates is c = -R^T t.
# M = Ry(yaw) Rx(pitch) Rz(roll): first yaw about the camera's y axis (pan), then pitch about the new x axis
# (tilt), then roll about the new optical axis (intrinsic y-x-z, like a camera on a tripod head). Signs in words:
#   yaw right  = +yaw: the optical axis turns towards +x (the scene then shifts LEFT in the image);
#   pitch up   = +pitch: the optical axis turns towards -y (up, since y points down);
#   roll cw    = +roll: the camera's x axis turns towards +y, i.e. the camera turns clockwise as seen from behind
#                it by the photographer (the image content then turns counter-clockwise).
# Ranges: yaw, roll in (-180, 180], pitch in [-90, 90]; angles are rounded to multiples of step_deg (15 by
# default). Near pitch +-90 the yaw/roll split is ill-defined (gimbal lock; roll is then set to 0); camera pairs
# of the pool are mostly upright, so this is rare.
# Move: the dominant axis of c (forward/back = +z/-z, right/left = +x/-x, down/up = +y/-y), direction only,
# because SfM / CO3D translations have no metric scale; "stay" when c is numerically zero (a pure rotation).
#
# Action grammar: exactly one block, before the answer block, e.g.
#     <action>
#     yaw right 30, pitch down 15, roll 0, move forward
#     </action>
# Items yaw, pitch, roll and move, each exactly once, in any order, separated by commas, semicolons or new lines.
# "yaw left|right A", "pitch up|down A", "roll cw|ccw A" with A a non-negative number of degrees (at most 180,
# pitch at most 90; an optional "deg"/"degrees"/"°" after it); the direction word may be left out only for 0.
# "move forward|back|left|right|up|down|stay". Tolerated: case, extra spaces, "backward(s)", "forwards",
# "clockwise", "counterclockwise", "counter-clockwise", "anticlockwise". Anything else in the block is malformed.
#
# Scoring (action_reward): each component is judged on its own against the EXACT (unrounded) pose:
# yaw/pitch/roll ok when the wrapped angle error is <= tol_deg (default 15 = one step, so the canonical rounded
# answer always passes and one step off may pass); move ok when the named unit direction d has
# c . d >= move_tol * max_i |c_i| (move_tol 0.9: the dominant axis, or one within 10% of it when two are nearly
# tied), or "stay" exactly when c = 0. action = mean of the four. A malformed or missing block scores 0.
# The action reward does not depend on the answer block (HATCH reports action and answer rewards separately).

ACTION_STEP_DEG = 15
_MOVE_DIRS = {"right": (1, 0, 0), "left": (-1, 0, 0), "down": (0, 1, 0), "up": (0, -1, 0),
              "forward": (0, 0, 1), "back": (0, 0, -1)}
_ACT_WORDS = {"yaw": {"right": 1, "left": -1}, "pitch": {"up": 1, "down": -1},
              "roll": {"cw": 1, "clockwise": 1, "ccw": -1, "counterclockwise": -1, "counter-clockwise": -1,
                       "anticlockwise": -1}}
_ACT_MAX = {"yaw": 180.0, "pitch": 90.0, "roll": 180.0}
_MOVE_ALIASES = {"backward": "back", "backwards": "back", "forwards": "forward"}


def action_instructions(step_deg=ACTION_STEP_DEG):
    """Prompt text for the action block (make_tasks.build_prompt(actor=True) puts it before the answer format)."""
    return (
        "Camera motion: before the answer block, write exactly one action block that says how the camera of "
        "image 1 moves to become the camera of image 2:\n"
        "<action>\n"
        "yaw right 30, pitch down 15, roll 0, move forward\n"
        "</action>\n"
        "Turn first (yaw left/right: pan the camera), then tilt (pitch up/down), then rotate about the viewing "
        "direction (roll cw/ccw: clockwise or counter-clockwise as seen from behind the camera); angles in "
        f"degrees, rounded to multiples of {step_deg:g}, 0 needs no direction word. Then name the main direction "
        "in which the camera moved, as seen from camera 1: move forward, back, left, right, up, down or stay.\n")




def _wrap180(a):
    """Angle in degrees -> (-180, 180]."""
    a = math.fmod(a, 360.0)
    if a <= -180.0:
        a += 360.0
    elif a > 180.0:
        a -= 360.0
    return a


def _pose_angles(R, t):
    """(yaw, pitch, roll) in degrees (exact) and the camera-2 centre c in camera-1 coordinates."""
    R = [[float(v) for v in row] for row in R]
    t = [float(v) for v in t]
    M = [[R[j][i] for j in range(3)] for i in range(3)]  # R^T: camera 2's orientation in camera 1's frame
    c = [-sum(M[i][j] * t[j] for j in range(3)) for i in range(3)]  # -R^T t
    pitch = math.asin(max(-1.0, min(1.0, -M[1][2])))
    if abs(M[1][2]) < 1 - 1e-9:
        yaw, roll = math.atan2(M[0][2], M[2][2]), math.atan2(M[1][0], M[1][1])
    else:  # gimbal lock: roll folded into yaw
        yaw, roll = math.atan2(-M[2][0], M[0][0]), 0.0
    return tuple(_wrap180(math.degrees(a)) for a in (yaw, pitch, roll)), c


def _dominant_move(c, eps=1e-9):
    if math.sqrt(sum(v * v for v in c)) <= eps:
        return "stay"
    return max(_MOVE_DIRS, key=lambda w: sum(a * b for a, b in zip(_MOVE_DIRS[w], c)))


def canonical_actions(R, t, step_deg=ACTION_STEP_DEG):
    """Pool pose (x2 = R x1 + t) -> dict(yaw, pitch, roll (signed degrees, rounded to step_deg), move (word),
    yaw_exact, pitch_exact, roll_exact). Signs: + = right / up / cw (see the section comment)."""
    (yaw, pitch, roll), c = _pose_angles(R, t)
    q = lambda a: float(round(a / step_deg) * step_deg)
    return dict(yaw=_wrap180(q(yaw)), pitch=max(-90.0, min(90.0, q(pitch))), roll=_wrap180(q(roll)),
                move=_dominant_move(c), yaw_exact=yaw, pitch_exact=pitch, roll_exact=roll)


def format_actions(actions):
    """dict(yaw, pitch, roll, move) -> the action block."""
    def item(name, words, a):
        if a == 0:
            return f"{name} 0"
        return f"{name} {words[0] if a > 0 else words[1]} {abs(a):g}"
    body = ", ".join([item("yaw", ("right", "left"), actions["yaw"]), item("pitch", ("up", "down"), actions["pitch"]),
                      item("roll", ("cw", "ccw"), actions["roll"]), f"move {actions['move']}"])
    return "<action>\n" + body + "\n</action>"


_ACT_OPEN = re.compile(r"<\s*action\s*>", re.IGNORECASE)
_ACT_CLOSE = re.compile(r"<\s*/\s*action\s*>", re.IGNORECASE)
_ACT_ANGLE = re.compile(r"(yaw|pitch|roll)(?: ([a-z-]+))? ([0-9]{1,3}(?:\.[0-9]{1,3})?) ?(?:°|deg|degrees?)?")
_ACT_MOVE = re.compile(r"move ([a-z]+)")


def parse_actions(text, max_chars=MAX_CHARS):
    """Completion text -> dict(yaw, pitch, roll (signed degrees), move (word)), or None when there is no single
    well-formed action block before the answer block. Never raises; linear in min(len(text), max_chars)."""
    span = block_before_answer(text, _ACT_OPEN, _ACT_CLOSE, max_chars)  # the action block comes before the answer
    if span is None:
        return None
    out = {}
    for raw in re.split(r"[,;\n]", text[span[0]:span[1]]):
        item = " ".join(raw.lower().split())
        if not item:
            continue
        mo = _ACT_ANGLE.fullmatch(item)
        if mo is not None:
            name, word, value = mo.group(1), mo.group(2), float(mo.group(3))
            if name in out or value > _ACT_MAX[name] or (word is None and value != 0):
                return None
            if word is not None and word not in _ACT_WORDS[name]:
                return None
            out[name] = value * (_ACT_WORDS[name][word] if word is not None else 1) + 0.0  # +0.0: no -0.0
            continue
        mo = _ACT_MOVE.fullmatch(item)
        if mo is None or "move" in out:
            return None
        word = _MOVE_ALIASES.get(mo.group(1), mo.group(1))
        if word not in _MOVE_DIRS and word != "stay":
            return None
        out["move"] = word
    return out if len(out) == 4 else None


def action_reward(text, R, t, tol_deg=ACTION_STEP_DEG, move_tol=0.9, max_chars=MAX_CHARS):
    """Action reward of one completion against the pool pose (see the section comment) -> dict(action, yaw_ok,
    pitch_ok, roll_ok, move_ok (floats 0/1), parsed (dict or None))."""
    parsed = parse_actions(text, max_chars=max_chars)
    if parsed is None:
        return dict(action=0.0, yaw_ok=0.0, pitch_ok=0.0, roll_ok=0.0, move_ok=0.0, parsed=None)
    exact, c = _pose_angles(R, t)
    ok = {k: float(abs(_wrap180(parsed[k] - e)) <= tol_deg + 1e-6)  # + 1e-6: float noise at the boundary
          for k, e in zip(("yaw", "pitch", "roll"), exact)}
    top = max(abs(v) for v in c)
    if parsed["move"] == "stay" or _dominant_move(c) == "stay":
        move_ok = float(parsed["move"] == _dominant_move(c))
    else:
        move_ok = float(sum(a * b for a, b in zip(_MOVE_DIRS[parsed["move"]], c)) >= move_tol * top)
    return dict(action=(sum(ok.values()) + move_ok) / 4, yaw_ok=ok["yaw"], pitch_ok=ok["pitch"],
                roll_ok=ok["roll"], move_ok=move_ok, parsed=parsed)

# -----------------------------------------------------------------------------
# The released rules (github aim-uofa/ReasonMatch): the benchmark's scorer and the training reward, written
# from their rules. Both are kept exactly as the release scores, quirks included, so numbers are comparable:
#
# Benchmark (released_json + released_prf, per sample, macro over samples in evaluate.py):
# - The JSON is the first ```json fenced block (the fence found case-insensitively), else the text from the
#   first "{" to the last "}". A fenced block that does not parse is a parse failure: no fall-back to braces.
# - A prediction of JSON null or "none" (any case) is skipped: a correct "none" earns nothing.
# - precision = correct / max(non-"none" predictions, 1): an all-"none" reply has precision 0.
#   recall = correct / ground-truth keys, and the ground truth also holds the image-1 distractors as "none"
#   keys, so a task with k "none" targets can reach recall (n - k) / n at most.
#   correct = a predicted key that is a ground-truth key with a value equal to the truth as a string (1 == "1").
# - An absent JSON, or one that is not a non-empty object, scores 0.
# Departure: where the release's parser would raise (nesting deeper than Python's recursion limit, integers
# over Python's 4,300-digit limit) we count a parse failure, so a malformed reply never stops a run.
#
# Training reward (released_reward; score = the sum of the four parts, the names the release logs):
# - thinking_format_reward 1 when the WHOLE reply is <thinking>...</thinking>, whitespace, <answer>...</answer>.
# - content_format_reward 1 when the first <answer> block, its ```json fence markers removed (case-sensitive),
#   parses as any JSON value.
# - repetition_penalty = -3 x (1 - distinct / total) over the 9-grams of the lower-cased, whitespace-split
#   words of the first thinking block; 0 without one or with fewer than 9 words.
#   Departure: the release segments text that is mostly Chinese with jieba first; we always split on whitespace.
# - accuracy_reward = (ground-truth keys predicted right as strings - 0.5 x predicted keys not in the ground
#   truth) / ground-truth keys; 0 when the answer does not parse as an object. The truth holds the string
#   "none" for distractors: a JSON null or an unquoted none is NOT a correct "none" here.

RELEASED_PARTS = ("thinking_format_reward", "content_format_reward", "repetition_penalty", "accuracy_reward")
_R_FENCE = re.compile(r"```json(.*?)```", re.IGNORECASE | re.DOTALL)
_R_BRACES = re.compile(r"\{.*\}", re.DOTALL)
_R_WHOLE = re.compile(r"<thinking>.*?</thinking>\s*<answer>.*?</answer>", re.DOTALL)
_R_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_R_THINKING = re.compile(r"<thinking>\s*(.*?)\s*</thinking>", re.DOTALL)
_R_FENCE_MARKS = re.compile(r"```json\s*|\s*```")
_JSON_FAILS = (ValueError, RecursionError)  # json.JSONDecodeError is a ValueError, so is the int-digits limit


def _json_or_fail(s):
    """(ok, value): json.loads without raising."""
    try:
        return True, json.loads(s)
    except _JSON_FAILS:
        return False, None


def released_json(text):
    """Reply text -> (raw, parsed) as the released benchmark extracts it: raw is the candidate JSON text (None
    when absent), parsed its value (None when raw is empty or does not parse). Never raises."""
    if not isinstance(text, str) or not text:
        return None, None
    fenced = _R_FENCE.search(text)
    if fenced:
        raw = fenced.group(1).strip()
    else:
        braces = _R_BRACES.search(text)
        if not braces:
            return None, None
        raw = braces.group(0)
    return raw, (_json_or_fail(raw)[1] if raw else None)


def _is_none_value(v):
    return v is None or (isinstance(v, str) and v.lower() == "none")


def released_prf(truth, pred):
    """(precision, recall, f1) of one sample by the released benchmark's rule; truth: {image-1 id: image-2 id or
    "none"} (string keys), pred: the parsed reply (anything)."""
    if not isinstance(truth, dict) or not isinstance(pred, dict) or not pred:
        return 0.0, 0.0, 0.0
    claimed = {k: v for k, v in pred.items() if not _is_none_value(v)}
    correct = sum(k in truth and str(v) == str(truth[k]) for k, v in claimed.items())
    precision = correct / max(len(claimed), 1)
    recall = correct / max(len(truth), 1)
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0)


def released_truth(task):
    """The released ground truth of a task: its "answer" dict when it has one (a released-layout sample), else
    {"1": image-2 id or "none", ...} built from our target list (None -> "none")."""
    if "answer" in task:
        return task["answer"]
    return {str(i + 1): "none" if t is None else str(t) for i, t in enumerate(task["target"])}


def _repetition_penalty(thinking, n=9, max_penalty=-3.0):
    words = thinking.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return max_penalty * (1 - len(set(grams)) / len(grams)) + 0.0  # + 0.0: no -0.0 in logs


def released_reward(text, task):
    """The released training reward of one completion -> dict(score, thinking_format_reward,
    content_format_reward, repetition_penalty, accuracy_reward). Never raises on any text."""
    text = text if isinstance(text, str) else ""
    truth = released_truth(task)
    answer = _R_ANSWER.search(text)
    ok, pred = _json_or_fail(_R_FENCE_MARKS.sub("", answer.group(1))) if answer else (False, None)
    thinking = _R_THINKING.search(text)
    parts = dict(
        thinking_format_reward=1.0 if _R_WHOLE.fullmatch(text) else 0.0,
        content_format_reward=1.0 if ok else 0.0,
        repetition_penalty=_repetition_penalty(thinking.group(1)) if thinking else 0.0,
        accuracy_reward=0.0,
    )
    if isinstance(pred, dict) and truth:
        right = sum(k in pred and str(pred[k]) == str(v) for k, v in truth.items())
        unknown = sum(k not in truth for k in pred)
        parts["accuracy_reward"] = (right - 0.5 * unknown) / len(truth)
    return dict(score=sum(parts.values()), **parts)
