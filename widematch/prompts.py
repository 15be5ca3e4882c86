"""The question text of a matching task: our own wording, or a template the user points to.

The task language (one for training and evaluation, the released benchmark's): both images carry numeric ids,
the model thinks in <thinking>...</thinking> and answers in <answer> with a JSON object that maps each image-1
id (a string key) to an image-2 id or "none".

read_template(path, think) returns the text to ask with:
- a Python file (the released evaluator's evaluate/matchbench/utils.py): its two template constants are read
  with `ast`, without importing the file (it imports things we do not need): THINK_NAME with thinking,
  NO_THINK_NAME without;
- any other file: its whole text, used for both variants.
Only the released template makes a benchmark number comparable with the paper's; default_prompt is ours.
"""
import ast
import os

THINK_NAME = "ANNO_MATCH_MULTI_TEMPLATE"
NO_THINK_NAME = "ANNO_MATCH_MULTI_NO_THINK_TEMPLATE"


class TemplateError(ValueError):
    """A prompt template file that cannot be used; the message names the file and what is wrong."""


def default_prompt(think=True, n=None, m=None, before_answer=None):
    """Our wording of the question (the same answer format as the released template). n, m: the number of
    labelled points on each image, said in the text when known; before_answer: a paragraph put before the answer
    format (make_tasks.py's ActoR action-block instructions)."""
    counts = ""
    if n is not None and m is not None:
        counts = (f" Image 1 shows {n} numbered point{'s' if n != 1 else ''} (1 to {n}); image 2 shows {m} "
                  f"(1 to {m}).")
    lines = [
        "The two images show the same scene from different viewpoints. Small green circles with numeric ids "
        "mark points on both images: each circle is centred on its point, and its id is written in white on a "
        "black box next to it, joined to it by a thin line." + counts,
        "For every numbered point of image 1, find the point of image 2 that shows the same physical spot, or "
        "say \"none\" when that spot is hidden or out of view in image 2.",
    ]
    example = '{"1": "2", "2": "none", "3": "1"}'
    if before_answer:
        lines.append(before_answer.strip())
    if think:
        lines.append("First reason inside <thinking> </thinking> tags: what each point lies on, what surrounds it, "
                     "and how the camera moved between the images. Then give the answer inside <answer> "
                     "</answer> tags.")
        lines.append(f"Answer format:\n<thinking>\n...\n</thinking>\n<answer>\n```json\n{example}\n```\n</answer>")
    else:
        lines.append(f"Give only the answer inside <answer> </answer> tags:\n<answer>\n```json\n{example}\n```\n"
                     "</answer>")
    lines.append("The answer is one JSON object: each key is an image-1 id as a string, each value an image-2 id "
                 "as a string or \"none\". Answer every image-1 id exactly once.")
    return "\n\n".join(lines)


def _python_constants(path, text):
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise TemplateError(f"{path}: not valid Python ({e.msg}, line {e.lineno})") from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found[node.targets[0].id] = node.value.value
    return found


def read_template(path, think=True):
    """The prompt text from a user's file (see the module docstring). Raises TemplateError naming the file."""
    if not os.path.isfile(path):
        raise TemplateError(f"{path}: no such file (--prompt-template wants the released utils.py or a text file)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".py"):
        consts = _python_constants(path, text)
        name = THINK_NAME if think else NO_THINK_NAME
        if name not in consts:
            raise TemplateError(f"{path}: no string constant {name} at the top level (is this the released "
                                "evaluate/matchbench/utils.py?)")
        text = consts[name]
    if not text.strip():
        raise TemplateError(f"{path}: the template is empty")
    return text


def describe(path, think=True):
    """One line for reports and args.json: which template asked the question."""
    if path is None:
        return f"widematch's own wording ({'thinking' if think else 'no thinking'}); not the released template"
    name = (THINK_NAME if think else NO_THINK_NAME) if path.endswith(".py") else "whole file"
    return f"{os.path.abspath(path)} ({name})"
