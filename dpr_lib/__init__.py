"""dpr_lib: Dense Passage Retrieval indexing at corpus scale, as batch ETL on Apache Spark.

Stages, in the order a passage travels through them:

    corpus     (raw documents -> Passages table, rejects)
    encode     (Passages -> Embeddings, through the passage encoder)
    index      (the merge job: Embeddings -> trained IVF quantizer + shards on executors;
                its FAISS work is index_ops, Spark-free)
    publish    (docstore, manifest, LATEST; the contract itself is manifest)
    search     (the loader used by search services and the CLI), serve (the HTTP service)
    evaluate   (with datasets, metrics, bm25), train_data and train/ (training)

Modules that a search service needs (config, errors, storage, manifest, index_ops, encode's
encoder, search, serve) import no pyspark.
"""

__version__ = "0.1.0"
