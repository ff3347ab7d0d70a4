"""Data: embedded corpus, BPE tokenizer, token shards, packing and the train/eval iterators."""
from parcae.data.corpus import embedded_documents
from parcae.data.pipeline import (TrainIterator, data_dir, dataset_info, default_data_config, eval_batches,
                                  make_train_iterator, prepare_embedded)

__all__ = ["TrainIterator", "data_dir", "dataset_info", "default_data_config", "embedded_documents",
           "eval_batches", "make_train_iterator", "prepare_embedded"]
