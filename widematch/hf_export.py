"""Writing a benchmark as a Hugging Face dataset and an lmms-eval task: the pieces export_bench.py (our tasks) and
widematch/reasonmatch.py (the released benchmark) share. ParquetRows streams rows into one parquet file with the
HF features in its schema; card_header is the dataset card's YAML front matter; REWARD_LOADER is the lines an
exported lmms-eval utils.py uses to load its verbatim copy of reward.py from beside itself, lmms_utils_head the
start of that utils.py (docstring, imports, loader, the two doc functions) and lmms_task_yaml the task yaml, which
both exports write."""
import math

ROWS_PER_GROUP = 100      # parquet row group: the hub's viewer and readers stream image data in small groups

REWARD_LOADER = '''_spec = importlib.util.spec_from_file_location(
    "widematch_reward", os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward.py"))
reward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reward)
'''

# The doc functions are the same in both exports but for their name prefix and docstrings; they are written into
# the text (not imported) because lmms-eval runs the utils.py without widematch installed.
DOC_FUNCTIONS = '''

def {prefix}_doc_to_visual(doc):
    """{visual_doc}"""
    return list(doc["images"])


def {prefix}_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """{text_doc}"""
    return doc["prompt"]


'''


def lmms_utils_head(docstring, imports, prefix, visual_doc, text_doc):
    """The start of an exported lmms-eval utils.py, self-contained: the module docstring (its text, without the
    quotes), an `import` line per module, sorted (REWARD_LOADER's importlib.util and os, plus imports, what the
    caller's own functions use), REWARD_LOADER, then <prefix>_doc_to_visual and <prefix>_doc_to_text with the given
    docstrings; the caller appends its process_results and aggregations."""
    modules = sorted({"importlib.util", "os", *imports})
    return ('"""' + docstring + '"""\n' + "".join(f"import {m}\n" for m in modules) + "\n" + REWARD_LOADER
            + DOC_FUNCTIONS.format(prefix=prefix, visual_doc=visual_doc, text_doc=text_doc))


# The task yaml both exports write; the comment lines (head, *_note) are each export's own words.
LMMS_TASK_YAML = """\
{head}
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    {split}: ../../data/{parquet}
test_split: {split}
output_type: generate_until
doc_to_visual: !function utils.{prefix}_doc_to_visual
doc_to_text: !function utils.{prefix}_doc_to_text
doc_to_target: answer
process_results: !function utils.{prefix}_process_results
{raw_note}
reasoning_tags: none
{decoding_note}
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  until: []
{metrics_note}
metric_list:
{metrics}
metadata:
  version: 1.0
{metadata}
"""


def lmms_task_yaml(*, head, task, split, parquet, prefix, raw_note, max_new_tokens, decoding_note, metrics_note,
                   metrics, metadata):
    """An exported lmms-eval task yaml: task (its --tasks name) on the parquet two folders up (relative data_files
    are resolved against the yaml: offline), the utils.py functions of prefix (lmms_utils_head's two and the
    caller's <prefix>_process_results), the raw reply scored (reasoning_tags: none), greedy decoding to
    max_new_tokens with no stop strings, metrics [(metric, aggregation function in utils.py)] (all higher is
    better) and metadata [(key, value)] after version 1.0. head, raw_note, decoding_note and metrics_note are the
    export's comment lines ("# ..."), put above what they explain."""
    metric_lines = "\n".join(f"  - metric: {m}\n    aggregation: !function utils.{agg}\n    higher_is_better: true"
                             for m, agg in metrics)
    return LMMS_TASK_YAML.format(head=head, task=task, split=split, parquet=parquet, prefix=prefix,
                                 raw_note=raw_note, max_new_tokens=max_new_tokens, decoding_note=decoding_note,
                                 metrics_note=metrics_note, metrics=metric_lines,
                                 metadata="\n".join(f"  {k}: {v}" for k, v in metadata))

class ParquetRows:
    """Rows -> one parquet file in row groups, the HF features in the schema's metadata (what datasets writes),
    so datasets.load_dataset gives back the same features; memory holds one group of images at a time."""

    def __init__(self, path, features):
        import pyarrow.parquet as pq
        self.features, self.schema, self.batch = features, features.arrow_schema, []
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def add(self, row):
        self.batch.append(self.features.encode_example(row))
        if len(self.batch) == ROWS_PER_GROUP:
            self.flush()

    def flush(self):
        import pyarrow as pa
        if self.batch:
            self.writer.write_table(pa.Table.from_pylist(self.batch, schema=self.schema))
            self.batch = []

    def close(self):
        self.flush()
        self.writer.close()


def card_header(features, split, n_rows, parquet, n_bytes, title):
    """The dataset card's YAML front matter (the hub's format, as push_to_hub writes it)."""
    import yaml
    size = next(s for lim, s in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (math.inf, "n>100K"))
                if n_rows < lim)
    header = {"pretty_name": title, "language": ["en"], "license": "other", "size_categories": [size],
              "task_categories": ["visual-question-answering", "image-text-to-text"],
              "tags": ["spatial-reasoning", "correspondence", "wide-baseline-matching", "multi-image"],
              "configs": [{"config_name": "default", "data_files": [{"split": split, "path": f"data/{parquet}"}]}],
              "dataset_info": {"features": features._to_yaml_list(),
                               "splits": [{"name": split, "num_bytes": n_bytes, "num_examples": n_rows}]}}
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n"
