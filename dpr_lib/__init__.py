"""dpr_lib: Dense Passage Retrieval indexing at corpus scale, as batch ETL on Apache Spark.

Stages, in the order a passage travels through them:

    corpus   (raw documents -> Passages table, rejects)
    encode   (Passages -> Embeddings, through the passage encoder)
    index    (Embeddings -> trained IVF quantizer + shards on executors)
    publish  (versions/<v>/ on object storage, manifest, LATEST)
    search   (the loader used by search services and the CLI)

Modules that a search service needs (config, errors, storage, encode's encoder, search)
import no pyspark.
"""

__version__ = "0.1.0"
