"""Writing a benchmark as a Hugging Face dataset and an lmms-eval task: the pieces export_bench.py (our tasks) and
widematch/reasonmatch.py (the released benchmark) share. ParquetRows streams rows into one parquet file with the
HF features in its schema; card_header is the dataset card's YAML front matter; REWARD_LOADER is the lines an
exported lmms-eval utils.py uses to load its verbatim copy of reward.py from beside itself."""
import math

ROWS_PER_GROUP = 100      # parquet row group: the hub's viewer and readers stream image data in small groups

REWARD_LOADER = '''_spec = importlib.util.spec_from_file_location(
    "widematch_reward", os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward.py"))
reward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reward)
'''


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
