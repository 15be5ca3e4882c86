"""Tests: the released benchmark's scorer and the released training reward (reward.py's released section), and
the prompt-template reader (widematch/prompts.py). Every expected value is worked out by hand in the comment."""
import pytest

import reward
from widematch import prompts

TRUTH = {"1": "2", "2": "none", "3": "1", "4": "none"}   # two matches, two distractors


@pytest.mark.parametrize("text, raw, parsed", [
    ('x ```json\n{"1": "2"}\n``` y {"9": "9"}', '{"1": "2"}', {"1": "2"}),      # the fence wins over braces
    ('```JSON {"1": 2} ```', '{"1": 2}', {"1": 2}),                             # fence found in any case
    ('think {"a": 1} then {"1": "2"}', '{"a": 1} then {"1": "2"}', None),       # first "{" to last "}": no parse
    ('```json\n{"1": oops}\n``` {"1": "2"}', '{"1": oops}', None),               # a bad fence: no fall-back
    ("```json``` tail", "", None),                                              # empty fence: raw "", no value
    ("no json here", None, None),
    ('```json\n["1", "2"]\n```', '["1", "2"]', ["1", "2"]),                     # a list parses (scored 0 later)
    ("[" * 50000 + "{}" + "]" * 50000, "{}", {}),                               # only the braces are taken
    ("{" + "[" * 50000 + "}", "{" + "[" * 50000 + "}", None),                   # too deep: a failure, no raise
    ('{"1": ' + "9" * 5000 + "}", '{"1": ' + "9" * 5000 + "}", None),           # over the int-digit limit
])
def test_released_json_extraction(text, raw, parsed):
    assert reward.released_json(text) == (raw, parsed)


@pytest.mark.parametrize("pred, expected", [
    ({"1": "2", "2": "none", "3": "1", "4": "none"}, (1.0, 0.5, 2 / 3)),   # perfect: correct "none" earns nothing
    ({"1": 2, "2": None, "3": "1", "4": "NONE"}, (1.0, 0.5, 2 / 3)),        # 2 == "2"; null and NONE skipped
    ({"1": "2", "3": "3"}, (0.5, 0.25, 1 / 3)),                             # 1 of 2 claims right, 1 of 4 keys
    ({"1": "2", "9": "1"}, (0.5, 0.25, 1 / 3)),                             # an extra key is a wrong prediction
    ({"1": "none", "2": "none", "3": "none", "4": "none"}, (0.0, 0.0, 0.0)),  # all none: precision 0/max(0,1)
    ({"2": "1"}, (0.0, 0.0, 0.0)),                                          # a claim on a distractor
    ({}, (0.0, 0.0, 0.0)), (["2", "none"], (0.0, 0.0, 0.0)), (None, (0.0, 0.0, 0.0)),
    ({"1": 2.0}, (0.0, 0.0, 0.0)),                                          # "2.0" != "2" as strings
])
def test_released_prf_by_hand(pred, expected):
    assert reward.released_prf(TRUTH, pred) == pytest.approx(expected)


def test_released_prf_all_none_task_scores_zero():
    # every target is "none": the release gives an all-"none" reply 0 (ours would give it 1)
    assert reward.released_prf({"1": "none", "2": "none"}, {"1": "none", "2": "none"}) == (0.0, 0.0, 0.0)


def test_released_truth_from_our_target():
    assert reward.released_truth({"target": ["2", None, "1"]}) == {"1": "2", "2": "none", "3": "1"}
    assert reward.released_truth({"answer": {"1": "none"}, "target": ["2"]}) == {"1": "none"}


def _reply(thinking, answer):
    return f"<thinking>{thinking}</thinking>\n<answer>\n```json\n{answer}\n```\n</answer>"


@pytest.mark.parametrize("text, parts", [
    # everything right: 1 + 1 + 0 + 4/4
    (_reply("a b c", '{"1": "2", "2": "none", "3": "1", "4": "none"}'), (1, 1, 0, 1.0)),
    # null and an unquoted-string "None" are not a correct "none": 2 of 4
    (_reply("x", '{"1": "2", "2": null, "3": "1", "4": "None"}'), (1, 1, 0, 0.5)),
    # integer ids equal as strings; one extra key costs 0.5: (2 - 0.5) / 4
    (_reply("x", '{"1": 2, "3": 1, "7": "3"}'), (1, 1, 0, 0.375)),
    # text before the thinking block: thinking format 0, the rest as usual: (1 - 0) / 4
    ("Sure. " + _reply("x", '{"1": "2"}'), (0, 1, 0, 0.25)),
    # text after the answer: thinking format 0
    (_reply("x", '{"1": "2"}') + " done", (0, 1, 0, 0.25)),
    # unparseable answer: content 0, accuracy 0
    (_reply("x", '{"1": "2",}'), (1, 0, 0, 0.0)),
    # a list parses as JSON (content 1) but scores no accuracy
    (_reply("x", '["2", "none"]'), (1, 1, 0, 0.0)),
    # a capital ```JSON fence is NOT removed here (case-sensitive): content 0
    ("<thinking>x</thinking><answer>```JSON\n{\"1\": \"2\"}\n```</answer>", (1, 0, 0, 0.0)),
    # no thinking block at all
    ('<answer>{"1": "2", "3": "1"}</answer>', (0, 1, 0, 0.5)),
    # 12 words "a b a b ..." -> 4 9-grams, 2 distinct: -3 x (1 - 2/4) = -1.5
    (_reply(" ".join(["a", "b"] * 6), '{"1": "2"}'), (1, 1, -1.5, 0.25)),
    # 9 distinct words -> 1 9-gram: 0; 8 words -> no 9-gram: 0
    (_reply(" ".join("abcdefghi"), '{}'), (1, 1, 0, 0.0)),
    (_reply("A a A a A a A a", '{}'), (1, 1, 0, 0.0)),
    # case-folded words: "A" == "a": 10 words all "a" -> 2 9-grams, 1 distinct: -3 x 0.5
    (_reply("A a A a A a A a A a", '{}'), (1, 1, -1.5, 0.0)),
])
def test_released_reward_parts_by_hand(text, parts):
    r = reward.released_reward(text, {"answer": TRUTH})
    got = tuple(r[k] for k in reward.RELEASED_PARTS)
    assert got == pytest.approx(parts)
    assert r["score"] == pytest.approx(sum(parts))


def test_released_reward_never_raises_on_junk():
    junk = ["", "<answer>", "<answer></answer>", "<thinking><thinking></thinking>", None, "<answer>" + "[" * 30000
            + "</answer>", "<answer>{\"1\": " + "9" * 6000 + "}</answer>", "\x00\udcff<answer>{}</answer>"]
    for text in junk:
        r = reward.released_reward(text, {"target": ["A", None]})
        assert set(r) == {"score", *reward.RELEASED_PARTS}


def test_prompt_template_reads_released_constants_without_import(tmp_path):
    f = tmp_path / "utils.py"
    f.write_text("import module_that_does_not_exist\n"
                 f'{prompts.THINK_NAME} = r"""think about it"""\n'
                 f'{prompts.NO_THINK_NAME} = "just answer"\n')
    assert prompts.read_template(str(f), think=True) == "think about it"
    assert prompts.read_template(str(f), think=False) == "just answer"
    txt = tmp_path / "mine.txt"
    txt.write_text("my own question\n")
    assert prompts.read_template(str(txt), think=False) == "my own question\n"


@pytest.mark.parametrize("content, message", [
    ("X = 1\n", "no string constant"), ("def (:\n", "not valid Python"),
])
def test_prompt_template_errors_name_the_file(tmp_path, content, message):
    f = tmp_path / "utils.py"
    f.write_text(content)
    with pytest.raises(prompts.TemplateError, match=message) as e:
        prompts.read_template(str(f))
    assert str(f) in str(e.value)
    with pytest.raises(prompts.TemplateError, match="no such file"):
        prompts.read_template(str(tmp_path / "missing.py"))


def test_default_prompt_asks_for_the_released_answer_format():
    p = prompts.default_prompt(think=True, n=3, m=4)
    assert "<thinking>" in p and "<answer>" in p and '"none"' in p and "1 to 3" in p and "1 to 4" in p
    assert "<thinking>" not in prompts.default_prompt(think=False)
