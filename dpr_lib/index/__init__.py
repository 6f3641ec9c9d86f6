"""Stage 3, index: the merge job and the one version writer.

- :mod:`~dpr_lib.index.job`: ``build_index``, the full build (plan, sample, train, shards, recall, publish);
- :mod:`~dpr_lib.index.delta`: ``build_delta``, the nightly delta segment;
- :mod:`~dpr_lib.index.writer`: ``VersionWriter``, through which both publish;
- :mod:`~dpr_lib.index.shards`: the shard tasks on executors and the files' shard plan;
- :mod:`~dpr_lib.index.sample`: the training sample drawn on executors;
- :mod:`~dpr_lib.index.recall`: recall questions, exact top-k, the nprobe choice, the recall lists a
  delta measures its own recall from.

The FAISS work itself is :mod:`dpr_lib.index_ops` (Spark-free).
"""

from dpr_lib.index.delta import DeltaRecallMiss, build_delta
from dpr_lib.index.job import Reuse, build_index
from dpr_lib.index.recall import encode_recall_questions, exact_topk, read_recall_questions
from dpr_lib.index.shards import ShardResult, build_shards, file_layout, pack_batch, plan_pieces, shard_of
from dpr_lib.index.writer import VersionWriter, discard_unpublished

__all__ = ["DeltaRecallMiss", "Reuse", "ShardResult", "VersionWriter", "build_delta", "build_index", "build_shards",
           "discard_unpublished", "encode_recall_questions", "exact_topk", "file_layout", "pack_batch",
           "plan_pieces", "read_recall_questions", "shard_of"]
