"""Offline data preparation: `python -m data_pipelines.train_tokenizer` and `python -m data_pipelines.shard`."""
